"""The old home of `load_split_documents`, kept for the one importer outside data/.

`train/pretrain.py` imports `load_split_documents` from here; train/ is being redesigned
(issue 16) by someone else, so it is not edited in this change. Everything else imports
`data.documents` (the source-kind dispatcher) and `data.readers` (the leaf readers).
TODO(issue 16): delete this module once train/pretrain.py imports data.documents.
"""

from data.documents import load_split_documents

__all__ = ["load_split_documents"]
