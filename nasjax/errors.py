"""The exceptions that mean "the user's input is wrong" (printed as one clear line by the CLI)."""

from nasjax.checkpointing import CheckpointError
from nasjax.config import ConfigFileError
from nasjax.data import DataError, DataFetchError
from nasjax.search.autodistil import DistilError
from nasjax.search.biws import SuperNetError
from nasjax.search.engine import EngineError
from nasjax.search.journal import JournalError
from nasjax.search.run import SearchError
from nasjax.sharding import MeshError
from nasjax.spec import SpecError
from nasjax.train.loop import TrainConfigError
from nasjax.train.optim import OptimConfigError
from nasjax.train.run import RunError

USER_ERRORS = (
    CheckpointError,
    ConfigFileError,
    DataError,
    DataFetchError,
    MeshError,
    JournalError,
    DistilError,
    SuperNetError,
    EngineError,
    SearchError,
    SpecError,
    TrainConfigError,
    OptimConfigError,
    RunError,
    FileNotFoundError,
)
