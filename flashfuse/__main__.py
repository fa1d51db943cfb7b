"""python -m flashfuse demo [--device cpu|cuda] [--repeats N]
python -m flashfuse check MODEL [--full] [--json]   (MODEL: a transformers model type, or a config file / folder)"""
import sys


def main(argv):
    if argv and argv[0] == "demo":
        from flashfuse.demo import main as demo
        return demo(argv[1:])
    if argv and argv[0] == "check":
        from flashfuse.check import main as check
        return check(argv[1:])
    print(__doc__.strip())
    return 2


sys.exit(main(sys.argv[1:]))
