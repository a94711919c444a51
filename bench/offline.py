def add_offline_args(p):
    pass


def run_offline_bench(args):
    return 0
