"""python -m flashfuse demo [--device cpu|cuda] [--repeats N]"""
import sys


def main(argv):
    if not argv or argv[0] != "demo":
        print(__doc__.strip())
        return 2
    from flashfuse.demo import main as demo
    return demo(argv[1:])


sys.exit(main(sys.argv[1:]))
