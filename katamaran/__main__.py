"""`python -m katamaran` is the `katamaran` command (the nodes' and the zipapp's way in).

It leaves through `os._exit` once `main()` returns: by then the run has cleaned up,
released the VM's lock and flushed both streams (`cli._release_dead_streams`), and
Python's own finalization would only tear down the ~400 modules pyroute2 imports: with
it, the destination VM's RESUME to both processes' exit took 59-86 ms over five
base-point migrations of the benchmark, 21-29 ms without it.  It would also wait for
any thread still blocked in a netlink call.  A usage error or `-h` leaves through
SystemExit as before.
"""

import os

from .cli import main

os._exit(main())
