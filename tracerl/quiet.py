"""Third-party console output (logs, warnings, progress bars) only when asked for: ``--verbose`` on the command
line, ``verbose=True`` in the Python API. A person reads the console; transformers, the hub, datasets, DeepSpeed
and W&B each print their own lines otherwise."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator


def _no_cpu_fallback_warning(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def quiet_third_party(verbose: bool) -> None:
    """For the whole process (the command line): third-party logs, warnings and progress bars only with
    ``verbose``. Set as environment variables too, so Ray actors started from here inherit them."""
    if not verbose:
        for key, value in (
            ("TRANSFORMERS_VERBOSITY", "error"),
            ("WANDB_SILENT", "true"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("HF_HUB_VERBOSITY", "error"),  # a retried download's "Retrying in 8s" lines
            ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
            ("PYTHONWARNINGS", "ignore"),
            ("RAY_DEDUP_LOGS", "1"),
            ("RAY_IGNORE_UNHANDLED_ERRORS", "1"),  # a dead learner rank's partner fails too: the loop says what died
        ):
            os.environ.setdefault(key, value)
        warnings.filterwarnings("ignore")
        for name in ("datasets", "huggingface_hub"):  # the variables above are read at import
            logging.getLogger(name).setLevel(logging.ERROR)
        # DeepSpeed's import logs a WARNING when it falls back to the CPU. Filter that one line rather than set
        # DS_ACCELERATOR=cpu: the variable would also skip DeepSpeed's detection of MPS, XPU or HPU devices.
        logging.getLogger("DeepSpeed").addFilter(_no_cpu_fallback_warning)
        if "datasets" in sys.modules:  # imported already: the environment variable is read only at import
            sys.modules["datasets"].disable_progress_bars()


@contextlib.contextmanager
def quiet_within(verbose: bool) -> Iterator[None]:
    """For one call of the Python API that runs in this process (``run_sft``): the same output hidden while it
    runs unless ``verbose``, and every setting restored after it, so a notebook keeps its own."""
    if verbose:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_off = are_progress_bars_disabled()
    deepspeed = logging.getLogger("DeepSpeed")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Writing model shards" when a model is saved
    disable_progress_bars()
    deepspeed.addFilter(_no_cpu_fallback_warning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        deepspeed.removeFilter(_no_cpu_fallback_warning)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_off:
            enable_progress_bars()
