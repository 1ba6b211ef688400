"""What every layer shares: the records and protocols they exchange (what an editor is asked,
`EditRequest`; what it may draw from the train split, `TrainPool`) and crash-safe file writes
(common/files.py). datamodules produces the records and editors consume them; neither imports
the other."""

from common.pool import Demonstration, TrainPool
from common.requests import EditRequest

__all__ = ["Demonstration", "EditRequest", "TrainPool"]
