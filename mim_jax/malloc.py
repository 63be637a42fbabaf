"""glibc malloc settings for training on CPU, applied by re-executing the command.

XLA's CPU runtime allocates a step's temporaries (activations and intermediates: 1.26 GB for
MAE Ti/4 at batch 128) as one block per step and frees it afterwards. glibc serves a block that
large with a fresh mmap and unmaps it on free, so every step page-faults on each 4 KB page and
the kernel zeroes it again: about 300k faults and ~20% of the step in the kernel. With one arena,
no mmap'd blocks and no trimming, the freed block stays in the heap and the next step reuses it,
with no fault. glibc reads these tunables only when a process starts, hence the re-exec. The
cost is that the process keeps its peak heap instead of returning it to the system.
"""

import os
import platform
import sys

import jax
from absl import logging

TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            f"glibc.malloc.trim_threshold={1 << 40}")


def reexec_for_cpu() -> None:
  """Re-executes this command with GLIBC_TUNABLES=TUNABLES when JAX runs on CPU under glibc.

  Returns without doing anything on other backends or C libraries, or when GLIBC_TUNABLES is
  already set (set it, even empty, to opt out). Call it first in main(), before
  jax.distributed.initialize: it initialises JAX's backend to learn the platform, and a
  multi-process run must not re-execute.
  """
  if (sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ
      or platform.libc_ver()[0] != "glibc" or jax.default_backend() != "cpu"):
    return
  logging.info("re-executing with GLIBC_TUNABLES=%s (see mim_jax/malloc.py)", TUNABLES)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=TUNABLES))
