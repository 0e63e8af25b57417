"""Names shared by :mod:`factscope.runs` (which writes run directories) and :mod:`factscope.report`
(which renders them), in a module of their own so that ``report`` need not import ``runs``."""

CHECKPOINT_DIR = "checkpoints"

# Keys of config.json that do not define the analysis: they may differ when a run is resumed.
# Put run-time settings that must not block a resume (device, batch size, progress bars, ...)
# under config["runtime"]; they are recorded but not compared.
NON_DEFINING_KEYS = frozenset({"versions", "created_utc", "resumed_utc", "runtime", "out", "resume"})
