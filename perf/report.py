"""Write the microbenchmark report of this device (same arguments as ``fastverify bench``):

    python perf/report.py [--quick] [--ops chain,tree] [--backends ...] [--dtype ...] [--out DIR]

→ perf/results/<device-slug>-<yyyymmdd>.{md,json,png} (fastverify/bench.py does the work).
"""

import shlex
import sys

from fastverify.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]], command=shlex.join(["python", "perf/report.py", *sys.argv[1:]])))
