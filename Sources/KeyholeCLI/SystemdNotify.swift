import KeyholeProxy

#if canImport(Glibc)
import Glibc
#endif

/// The service manager's readiness protocol (sd_notify): datagrams like `READY=1` to the
/// unix socket in `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Without
/// the variable it does nothing, so `keyhole proxy` runs the same outside systemd.
enum SystemdNotify {
    static func send(_ fields: String) {
        guard let path = getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), !path.isEmpty else { return }
        let message = fields + "\nMAINPID=\(getpid())"
        let fd = UnixDatagram.connect(path)
        guard fd >= 0 else { return }
        defer { close(fd) }
        _ = message.withCString { Glibc.send(fd, $0, strlen($0), 0) }
    }

    /// For `RELOADING=1` (systemd wants the monotonic time with it).
    static var monotonicMicroseconds: UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1000
    }
}
