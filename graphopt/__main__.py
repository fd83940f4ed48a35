import sys

try:
    from graphopt.cli import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load: nothing has started yet
    print("graphopt: interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
