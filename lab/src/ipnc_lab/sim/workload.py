"""A stand-in pod process: recording listeners as one uid, for the demo's app and Envoy stand-ins.

Run as `python -m ipnc_lab.sim.workload --listen LABEL:PORT[:transparent] ...` inside the
pod's namespace as the workload's uid (e.g. 1337 for the Envoy stand-in). It prints `ready` once every
socket listens, then one JSON line per connection received (label, source, original destination), and
answers each client with the same (see sim.traffic). It exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from .traffic import Received, Server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", action="append", required=True, metavar="LABEL:PORT[:transparent]")
    args = parser.parse_args(argv)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def report(entry: Received) -> None:
        line = {"label": entry.label, "source": entry.source, "orig": entry.orig, "local": entry.local}
        print(json.dumps(line), flush=True)

    server = Server(on_receive=report)
    for spec in args.listen:
        label, port, *flags = spec.split(":")
        server.add(None, label, int(port), transparent="transparent" in flags)
    server.start()
    print("ready", flush=True)
    try:
        done.wait()
    finally:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
