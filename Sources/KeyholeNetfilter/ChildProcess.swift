import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A child process started with `posix_spawn` and reaped with `waitpid`.
///
/// Foundation's `Process` notices a child's exit through a loopback socket pair; in a network
/// namespace whose `lo` is down that pair cannot be made and `waitUntilExit()` never returns.
/// Keyhole runs inside such namespaces (`ip netns exec … keyhole run`), so it spawns its
/// tools (nft, ip, apt-get, QEMU) itself.
public final class ChildProcess: Sendable {
    public let pid: Int32
    private let status = Mutex<Int32?>(nil)

    /// Starts `executable` with `arguments`, its standard streams on the given descriptors
    /// (which stay open in the parent; the caller closes its copies).
    public init(_ executable: String, _ arguments: [String], stdin: Int32, stdout: Int32, stderr: Int32) throws(NetfilterError) {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, stdin, 0)
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // The child starts with default signal handling (Keyhole ignores some signals).
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGINT, SIGTERM, SIGHUP, SIGPIPE] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var child: pid_t = 0
        let result = posix_spawn(&child, executable, &actions, &attributes, argv, environ)
        guard result == 0 else {
            throw .command(([executable] + arguments).joined(separator: " "), String(cString: strerror(result)))
        }
        pid = child
    }

    /// Waits for the child; its exit status, or 128 + the signal that ended it.
    @discardableResult
    public func wait() -> Int32 {
        if let known = status.withLock({ $0 }) { return known }
        var raw: Int32 = 0
        while waitpid(pid, &raw, 0) < 0 {
            if errno != EINTR {
                return status.withLock { $0 } ?? 1
            }
        }
        return record(raw)
    }

    /// The exit status if the child has ended (reaping it), else nil.
    public func poll() -> Int32? {
        if let known = status.withLock({ $0 }) { return known }
        var raw: Int32 = 0
        guard waitpid(pid, &raw, WNOHANG) == pid else { return nil }
        return record(raw)
    }

    /// Decodes a `waitpid` status (exit code, or 128 + signal) and remembers it.
    private func record(_ raw: Int32) -> Int32 {
        let code = (raw & 0x7F) == 0 ? (raw >> 8) & 0xFF : 128 + (raw & 0x7F)
        status.withLock { $0 = code }
        return code
    }

    public func signal(_ number: Int32) {
        if status.withLock({ $0 }) == nil { kill(pid, number) }
    }

    /// Everything `fd` delivers until end of file.
    public static func readAll(_ fd: Int32) -> [UInt8] {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return data }
            data += chunk[0..<n]
        }
    }

    /// A pipe whose two ends are closed on exec (the child gets its copy through dup2).
    public static func pipe() -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        _ = Glibc.pipe(&fds)
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        return (fds[0], fds[1])
    }
}

/// Runs a system tool to completion and returns its combined output; a non-zero exit is an
/// error that names the command and carries what it printed.
public enum HostCommand {
    /// A child that exits before reading all its input must not kill Keyhole with SIGPIPE.
    static let ignoreBrokenPipes: Void = { signal(SIGPIPE, SIG_IGN) }()

    @discardableResult
    public static func run(_ executable: String, _ arguments: [String], input: String? = nil, directory: String? = nil) throws(NetfilterError) -> String {
        _ = ignoreBrokenPipes
        var executable = executable
        var arguments = arguments
        if let directory {
            arguments = ["-c", "cd \"$0\" && exec \"$@\"", directory, executable] + arguments
            executable = "/bin/sh"
        }
        let stdin = ChildProcess.pipe()
        let output = ChildProcess.pipe()
        let child: ChildProcess
        do {
            child = try ChildProcess(executable, arguments, stdin: stdin.read, stdout: output.write, stderr: output.write)
        } catch {
            for fd in [stdin.read, stdin.write, output.read, output.write] { close(fd) }
            throw error
        }
        close(stdin.read)
        close(output.write)
        // The input is written from another thread, so a child that prints a lot before it
        // reads cannot block both of us.
        let writer = Thread {
            if let input {
                let bytes = Array(input.utf8)
                bytes.withUnsafeBytes { buffer in
                    var offset = 0
                    while offset < buffer.count {
                        let n = Glibc.write(stdin.write, buffer.baseAddress! + offset, buffer.count - offset)
                        if n < 0 && errno == EINTR { continue }
                        if n <= 0 { break }
                        offset += n
                    }
                }
            }
            close(stdin.write)
        }
        writer.start()
        let data = ChildProcess.readAll(output.read)
        close(output.read)
        let status = child.wait()
        let text = String(decoding: data, as: UTF8.self)
        guard status == 0 else {
            throw .command(([executable] + arguments).joined(separator: " "), text.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        return text
    }
}
