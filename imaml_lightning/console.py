"""What the libraries print on every run that tells a user of this program nothing they can act
on: filtered at the entry point, each by its exact text. The program's own messages, and every
other warning, stay."""
import logging
import warnings

LIBRARY_WARNINGS = (  # (category, message pattern)
    # torch's jvp loads its own decompositions with torch.jit.script, deprecated in torch 2.14.
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),
    # Lightning 2.6's batch flattening on torch 2.14's pytree.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # data.num_workers 0 is the default by choice: loading episodes in the training process does
    # not hold a meta-step back (docs/benchmarks.md, data_pipeline); the setting is there.
    (UserWarning, r".*does not have many workers"),
)
ADVERTISING = ("💡 Tip:",)  # Lightning's suggestion of a cloud service, on every run
RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class _NoAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTISING)


def quiet_library_notices() -> None:
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(_NoAdvertising())
