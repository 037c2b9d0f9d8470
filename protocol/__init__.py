"""qmoi-sync wire contract: identities, membership, keys, envelopes, frames (sans-I/O).

Import the concept modules directly (``from qmoi_sync.protocol.envelope import seal``); this
package only re-exports the versions and the error base class.
"""

from .errors import ProtocolError
from .version import PROTO_VERSION, __version__

__all__ = ["PROTO_VERSION", "ProtocolError", "__version__"]
