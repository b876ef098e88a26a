import os
import sys

from . import cpu_malloc

# glibc reads its malloc settings only at start-up: run again, once, with them (see cpu_malloc).
if cpu_malloc.wants_tuning(os.environ, cuda=cpu_malloc.cuda_expected()) and sys.orig_argv:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], cpu_malloc.with_tuned_malloc(os.environ))

from .cli import main  # noqa: E402  (after the re-exec: nothing heavy is imported twice)

sys.exit(main())
