"""``python -m optical_kernels.distill`` = the ``optical-kernels`` command line."""

from optical_kernels.distill.cli import main

raise SystemExit(main())
