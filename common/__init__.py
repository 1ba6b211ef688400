"""What every layer shares: the records and protocols they exchange (what a model is asked,
`Prompt`; what an editor is asked, `EditRequest`; what it may draw from the train split,
`TrainPool`), the hparams parser and crash-safe file writes (common/files.py). It imports
nothing of the project's own. datamodules produces the records and editors consume them; neither imports
the other."""

from common.pool import Demonstration, TrainPool
from common.prompt import Prompt, Turn
from common.requests import EditRequest

__all__ = ["Demonstration", "EditRequest", "Prompt", "TrainPool", "Turn"]
