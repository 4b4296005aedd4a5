"""What tests/test_warm.py runs as a flow-run process instead of Prefect's engine (through
UBO_WARM_MODULE): it reports what it was handed, or waits for a signal, as its environment
says."""

import json
import os
import signal
import sys
import time

if __name__ == "__main__":
    mode = os.environ["PROBE_MODE"]
    if mode == "echo":
        report = {
            "cwd": os.getcwd(),
            "value": os.environ.get("PROBE_VALUE"),
            "warm": "torch" in sys.modules,  # a cold interpreter has not imported it
            "argv": sys.argv[1:],
        }
        print(json.dumps(report), flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
    if mode == "wait":
        marker = os.environ["PROBE_MARKER"]

        def terminated(_signum, _frame):
            with open(marker, "a") as out:
                out.write("terminated\n")
            sys.exit(7)

        signal.signal(signal.SIGTERM, terminated)
        with open(marker, "w") as out:
            out.write(f"{os.getpid()}\n")
        time.sleep(120)
        sys.exit(0)
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
