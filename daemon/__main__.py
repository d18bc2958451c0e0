"""`python -m daemon` is the `whisperd` command."""

from daemon.cli import main

raise SystemExit(main())
