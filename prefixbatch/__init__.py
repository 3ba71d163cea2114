"""prefixbatch: offline batch LLM inference over Parquet that plans shared prefixes up front.

The public surface is the CLI (`prefixbatch run job.yaml`) and these few names.
"""

from prefixbatch.errors import PrefixbatchError, UserError

__version__ = "0.1.0"

__all__ = ["PrefixbatchError", "UserError", "__version__"]
