#!/usr/bin/env python3
"""A build hook that records what it is sent, for interop and actor tests.

Environment (inherited from whoever starts the hook):
  HOOK_DIR      directory for the recordings (required):
                  stdin.bin   every byte read from fd 0, appended as it arrives
                  argv        one line per process: pid, then argv[1:] (NUL-separated)
                  cwd         one line per process
  HOOK_REPLIES  comma-separated replies, one per `try` request in order across all
                processes (the last one repeats); default `decline`. A reply is
                `accept:MACHINE` (then the inputs and missing outputs are read),
                `decline`, `decline-permanently`, `postpone`, `garbage:TEXT` (the
                line TEXT), `die` (exit 1 without answering), `hang`,
                `decline-close` (decline, then close every pipe, print
                `dying words` first, and linger: the next request hits a broken pipe);
                the file `closed` appears once fd 0 is closed.
  HOOK_BUILD    after accepting: `ok` (write to fd 4 and exit 0, default),
                `fail` (exit 1), `hang` (sleep forever), `noline` (no machine line).
"""
import os
import struct
import sys
import time

d = os.environ["HOOK_DIR"]


def save(b):
    with open(os.path.join(d, "stdin.bin"), "ab") as f:
        f.write(b)


def read_exact(n):
    out = b""
    while len(out) < n:
        c = os.read(0, n - len(out))
        if not c:
            sys.exit(0)
        save(c)
        out += c
    return out


def read_int():
    return struct.unpack("<Q", read_exact(8))[0]


def read_str():
    n = read_int()
    s = read_exact(n)
    pad = (8 - n % 8) % 8
    read_exact(pad)
    return s.decode()


def read_set():
    return [read_str() for _ in range(read_int())]


def say(line):
    os.write(2, (line + "\n").encode())


def next_reply():
    replies = os.environ.get("HOOK_REPLIES", "decline").split(",")
    counter = os.path.join(d, "count")
    try:
        n = int(open(counter).read())
    except OSError:
        n = 0
    with open(counter, "w") as f:
        f.write(str(n + 1))
    return replies[min(n, len(replies) - 1)]


with open(os.path.join(d, "argv"), "a") as f:
    f.write("%d %s\n" % (os.getpid(), "\0".join(sys.argv[1:])))
with open(os.path.join(d, "cwd"), "a") as f:
    f.write(os.getcwd() + "\n")

while True:
    flag = read_int()
    if flag == 0:
        break
    read_str()
    read_str()

while True:
    if read_str() != "try":
        sys.exit(0)
    read_int()
    read_str()
    read_str()
    read_set()
    reply = next_reply()
    say("@nix " + '{"action":"msg","level":3,"msg":"recorder pid %d"}' % os.getpid())
    if reply == "die":
        sys.exit(1)
    if reply == "hang":
        time.sleep(3600)
    if reply == "decline-close":
        say("# decline")
        os.close(0)
        open(os.path.join(d, "closed"), "w").close()
        say("dying words")
        os.close(1)
        os.close(2)
        time.sleep(30)
        sys.exit(0)
    if reply.startswith("garbage:"):
        say(reply[len("garbage:"):])
        continue
    if not reply.startswith("accept:"):
        say("# " + reply)
        continue
    say("# accept")
    build = os.environ.get("HOOK_BUILD", "ok")
    if build == "noline":
        sys.exit(0)
    say(reply[len("accept:"):])
    read_set()
    read_set()
    if os.read(0, 1) != b"":
        sys.exit(3)
    os.write(4, b"remote log line\npartial")
    say("a plain stderr line")
    say('@nix {"action":"msg","level":0,"msg":"remote says hi"}')
    if build == "fail":
        sys.exit(1)
    if build == "hang":
        time.sleep(3600)
    sys.exit(0)
