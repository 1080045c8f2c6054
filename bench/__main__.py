import sys

try:
    from bench.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing the command line
    print("detbench: interrupted (SIGINT); nothing partial was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
