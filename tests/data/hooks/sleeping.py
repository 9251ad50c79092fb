#!/usr/bin/env python3
"""A build hook whose remote builds take long, for the cancellation tests.

Environment (inherited from whoever starts the hook):
  HOOK_DIR     directory where an accepted build records `pids`: the hook's pid and
               its child's, one line (written atomically)
  HOOK_ACCEPT  accept `try` requests whose .drv path contains this; decline others
  HOOK_REPLY   when set, answer this line instead of accepting (e.g. garbage)
  HOOK_BUILD   `noop`: an accepted build exits 0 at once without building
  HOOK_SLEEP   seconds the accepted build's child sleeps (default 30)
  HOOK_ESCAPE  when set, that child first leaves the process group (setsid), still
               holding the log pipe (fd 4)

It speaks Nix 2.8's hook protocol: the settings preamble, then `try` requests
(am-willing, system, drv path, required features) answered on stderr with
`# accept` + machine name, `# decline`, or HOOK_REPLY; after an accept, the inputs
and wanted outputs are read and the build's log goes to fd 4.
"""
import os, struct, sys, time

d = os.environ["HOOK_DIR"]


def rd(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            sys.exit(0)
        b += c
    return b


def num():
    return struct.unpack("<Q", rd(8))[0]


def text():
    n = num()
    v = rd(n)
    rd((8 - n % 8) % 8)
    return v.decode()


def strings():
    return [text() for _ in range(num())]


def say(line):
    os.write(2, (line + "\n").encode())


while num():
    text()
    text()
while True:
    if text() != "try":
        sys.exit(0)
    num()
    text()
    drv = text()
    strings()
    if os.environ["HOOK_ACCEPT"] not in drv:
        say("# decline")
        continue
    if os.environ.get("HOOK_REPLY"):
        say(os.environ["HOOK_REPLY"])
        continue
    say("# accept")
    say("remote-machine")
    strings()
    strings()
    if os.environ.get("HOOK_BUILD") == "noop":
        sys.exit(0)
    os.write(4, b"remote build started\n")
    child = os.fork()
    if child == 0:
        if os.environ.get("HOOK_ESCAPE"):
            os.setsid()
        time.sleep(float(os.environ.get("HOOK_SLEEP", "30")))
        os._exit(0)
    with open(os.path.join(d, "pids.tmp"), "w") as f:
        f.write("%d %d\n" % (os.getpid(), child))
    os.rename(os.path.join(d, "pids.tmp"), os.path.join(d, "pids"))
    os.waitpid(child, 0)
    sys.exit(0)
