"""The replay lab: reproduce a recorded seaking-proxy session offline.

    python replay.py RECORDING [--config FILE]

Serves the recording's upstream attempts with mitmproxy's server replay, runs the proxy against them, sends the
recorded client requests, and prints the recorded and replayed attempt histories side by side. Exit status: 0 when
they agree, 1 when not, 2 when the recording cannot be used. The work is done in seaking/lab/replay.py.
"""

import sys

from seaking.lab.replay import main

if __name__ == "__main__":
    sys.exit(main())
