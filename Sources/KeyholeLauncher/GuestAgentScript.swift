/// The builtin guest's command agent, for sandboxes that stay up and run many commands (the
/// Swift SDK's `Sandbox.run`). It speaks JSON lines on a virtio console (`/dev/hvc0`),
/// which QEMU connects to a Unix socket on the host:
///
/// ```
/// host → guest  {"t":"hello"}                                     the agent answers ready
///               {"t":"run","id":N,"argv":[…],"env":{…},"cwd":"…"}  start a command
///               {"t":"signal","id":N,"sig":9}                      signal its process group
/// guest → host  {"t":"ready"}
///               {"t":"out","id":N,"fd":1|2,"data":"<base64>"}      output as it comes
///               {"t":"exit","id":N,"status":S[,"error":"…"]}       it ended (128+n for signal n)
/// ```
///
/// Commands run as root in the guest with the sandbox's environment (placeholders, plain
/// env, CA trust variables), stdin from /dev/null, each in its own session. The host treats
/// everything the agent sends as untrusted input (bounded lines, checked fields).
public enum GuestAgentScript {
    /// Where the layer puts the agent in the guest.
    public static let path = "/keyhole/agent.py"

    public static let source = #"""
        import base64, json, os, signal, subprocess, sys, threading, time, tty

        # Commands get default signal dispositions and no blocked signals, whatever this
        # process inherited.
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

        if sys.argv[1] == "--listen":
            # Off the guest, for tests: serve one connection on a Unix socket.
            import socket
            server = socket.socket(socket.AF_UNIX)
            server.bind(sys.argv[2])
            server.listen(1)
            fd = server.accept()[0].detach()
        else:
            fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
            tty.setraw(fd)
        lock = threading.Lock()
        procs = {}

        def send(message):
            data = memoryview((json.dumps(message, separators=(",", ":")) + "\n").encode())
            with lock:
                while data:
                    data = data[os.write(fd, data):]

        def pump(ident, pipe, number):
            while True:
                chunk = pipe.read1(32768)
                if not chunk:
                    return
                send({"t": "out", "id": ident, "fd": number, "data": base64.b64encode(chunk).decode()})

        def run(message):
            ident = message["id"]
            env = dict(os.environ)
            env.update(message.get("env") or {})
            try:
                proc = subprocess.Popen(message["argv"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, cwd=message.get("cwd") or "/root",
                                        start_new_session=True)
            except OSError as error:
                send({"t": "exit", "id": ident, "status": 127 if isinstance(error, FileNotFoundError) else 126,
                      "error": str(error)})
                return
            procs[ident] = proc
            pumps = [threading.Thread(target=pump, args=(ident, proc.stdout, 1)),
                     threading.Thread(target=pump, args=(ident, proc.stderr, 2))]
            for thread in pumps:
                thread.start()
            for thread in pumps:
                thread.join()
            status = proc.wait()
            procs.pop(ident, None)
            send({"t": "exit", "id": ident, "status": 128 - status if status < 0 else status})

        def handle(message):
            kind = message.get("t")
            if kind == "hello":
                send({"t": "ready"})
            elif kind == "run":
                threading.Thread(target=run, args=(message,), daemon=True).start()
            elif kind == "signal":
                proc = procs.get(message.get("id"))
                if proc is not None:
                    try:
                        os.killpg(proc.pid, int(message.get("sig", 9)))
                    except OSError:
                        pass

        send({"t": "ready"})
        pending = b""
        while True:
            data = os.read(fd, 65536)
            if not data:
                time.sleep(0.1)
                continue
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                try:
                    handle(json.loads(line))
                except Exception as error:
                    sys.stderr.write("keyhole agent: %s\n" % error)

        """#
}
