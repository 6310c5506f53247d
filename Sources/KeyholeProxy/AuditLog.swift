public import Foundation
import KeyholePolicy
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One audit event. Never carries a secret's value or a request's query.
public struct AuditRecord: Sendable {
    public enum Level: String, Sendable {
        case info, warn, error
    }

    public var level: Level
    public var event: String
    public var sandbox: String
    public var connection: UInt64
    public var secret: String?
    public var site: String?
    public var form: String?
    public var reason: String?
    public var action: String?
    public var sni: String?
    public var host: String?
    public var destination: String?
    public var method: String?
    public var path: String?
    public var detail: String?
    /// What the guest got for a block: `reset` or `http-403`.
    public var response: String?

    public init(
        level: Level, event: String, sandbox: String, connection: UInt64, secret: String? = nil, site: String? = nil,
        form: String? = nil, reason: String? = nil, action: String? = nil, sni: String? = nil, host: String? = nil,
        destination: String? = nil, method: String? = nil, path: String? = nil, detail: String? = nil, response: String? = nil
    ) {
        self.response = response
        self.level = level
        self.event = event
        self.sandbox = sandbox
        self.connection = connection
        self.secret = secret
        self.site = site
        self.form = form
        self.reason = reason
        self.action = action
        self.sni = sni
        self.host = host
        self.destination = destination
        self.method = method
        self.path = path
        self.detail = detail
    }

    /// One JSON object on one line (without the newline).
    public func jsonLine(time: Date = Date()) -> String {
        var out: [UInt8] = []
        appendJSONLine(to: &out, time: time)
        return String(decoding: out.dropLast(), as: UTF8.self)
    }

    /// Appends the JSON object and a newline to `out`: one buffer, no intermediate strings
    /// (this runs for every substitution, on the proxy's event loops).
    func appendJSONLine(to out: inout [UInt8], time: Date) {
        var cache = TimestampCache()
        appendJSONLine(to: &out, time: time, cache: &cache)
    }

    /// The same, reusing the date and time of day formatted for an earlier record in the
    /// same second.
    func appendJSONLine(to out: inout [UInt8], time: Date, cache: inout TimestampCache) {
        out.reserveCapacity(out.count + 256)
        Self.appendTimeField(time, to: &out, cache: &cache)
        appendFieldsAfterTime(to: &out)
    }

    /// The start of every line: `{"time":"…"`.
    static func appendTimeField(_ time: Date, to out: inout [UInt8], cache: inout TimestampCache) {
        appendLiteral("{", to: &out)
        appendKey("time", to: &out, first: true)
        appendTimestamp(time, to: &out, cache: &cache)
    }

    /// The rest of the line after the time, newline included. It does not depend on the
    /// time: a writer that repeats a record may keep these bytes (`AuditLog.write(info:)`).
    func appendFieldsAfterTime(to out: inout [UInt8]) {
        Self.appendField("level", level.rawValue, to: &out)
        Self.appendField("sandbox", sandbox, to: &out)
        Self.appendKey("connection", to: &out, first: false)
        Self.appendDecimal(connection, to: &out)
        Self.appendField("event", event, to: &out)
        // One call per field (no array of pairs to allocate for every record).
        func optional(_ key: StaticString, _ value: String?) {
            guard let value else { return }
            Self.appendField(key, value, to: &out)
        }
        optional("secret", secret)
        optional("site", site)
        optional("form", form)
        optional("reason", reason)
        optional("action", action)
        optional("sni", sni)
        optional("host", host)
        optional("destination", destination)
        optional("method", method)
        optional("path", path)
        optional("detail", detail)
        optional("response", response)
        Self.appendLiteral("}\n", to: &out)
    }

    /// Appends a literal's bytes (a `StaticString` is one contiguous copy, where a `String`'s
    /// `utf8` view goes through the generic sequence path).
    static func appendLiteral(_ text: StaticString, to out: inout [UInt8]) {
        out.append(contentsOf: UnsafeBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
    }

    static func appendKey(_ key: StaticString, to out: inout [UInt8], first: Bool) {
        appendLiteral(first ? "\"" : ",\"", to: &out)
        appendLiteral(key, to: &out)
        appendLiteral("\":", to: &out)
    }

    static func appendField(_ key: StaticString, _ value: String, to out: inout [UInt8]) {
        appendKey(key, to: &out, first: false)
        appendQuoted(value, to: &out)
    }

    /// The date and time of day of one second, formatted (`2026-11-23T02:44:10`).
    struct TimestampCache {
        var second = Int64.min
        var text: [UInt8] = []
    }

    /// RFC 3339 UTC with milliseconds (`2026-11-23T02:44:10.123Z`), from `gmtime_r` (once a
    /// second with `cache`).
    static func appendTimestamp(_ date: Date, to out: inout [UInt8], cache: inout TimestampCache) {
        let total = Int64((date.timeIntervalSince1970 * 1000).rounded(.down))
        let second = total.quotientAndRemainder(dividingBy: 1000).quotient - (total < 0 && total % 1000 != 0 ? 1 : 0)
        let millis = Int(total - second * 1000)
        if cache.second != second {
            var seconds = time_t(second)
            var parts = tm()
            gmtime_r(&seconds, &parts)
            var text: [UInt8] = []
            func two(_ value: Int32) {
                text.append(UInt8(48 + value / 10))
                text.append(UInt8(48 + value % 10))
            }
            text += String(1900 + parts.tm_year).utf8
            text.append(UInt8(ascii: "-")); two(parts.tm_mon + 1)
            text.append(UInt8(ascii: "-")); two(parts.tm_mday)
            text.append(UInt8(ascii: "T")); two(parts.tm_hour)
            text.append(UInt8(ascii: ":")); two(parts.tm_min)
            text.append(UInt8(ascii: ":")); two(parts.tm_sec)
            cache = TimestampCache(second: second, text: text)
        }
        out.append(UInt8(ascii: "\""))
        out += cache.text
        out.append(UInt8(ascii: "."))
        out.append(UInt8(48 + millis / 100))
        out.append(UInt8(48 + (millis / 10) % 10))
        out.append(UInt8(48 + millis % 10))
        appendLiteral("Z\"", to: &out)
    }

    static func timestamp(_ date: Date) -> String {
        var out: [UInt8] = []
        var cache = TimestampCache()
        appendTimestamp(date, to: &out, cache: &cache)
        return String(decoding: out.dropFirst().dropLast(), as: UTF8.self)
    }

    static func appendDecimal(_ value: UInt64, to out: inout [UInt8]) {
        // The place value of the leading digit, then one digit per place.
        var unit: UInt64 = 1
        while unit <= value / 10 { unit *= 10 }
        var rest = value
        while unit > 0 {
            out.append(UInt8(48 + rest / unit))
            rest %= unit
            unit /= 10
        }
    }

    /// A JSON string literal for `value` (quotes, backslashes and control characters escaped).
    public static func quote(_ value: String) -> String {
        var out: [UInt8] = []
        appendQuoted(value, to: &out)
        return String(decoding: out, as: UTF8.self)
    }

    static func appendQuoted(_ value: String, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        // Native strings are contiguous UTF-8: one pass to check, one copy.
        let copied: Bool? = value.utf8.withContiguousStorageIfAvailable { bytes in
            for byte in bytes where byte < 0x20 || byte == 0x7F || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") { return false }
            out.append(contentsOf: bytes)
            return true
        }
        if copied == true {
            out.append(UInt8(ascii: "\""))
            return
        }
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""): out += "\\\"".utf8
            case UInt8(ascii: "\\"): out += "\\\\".utf8
            case 0..<0x20, 0x7F:
                let hex = Array("0123456789abcdef".utf8)
                out += "\\u00".utf8
                out.append(hex[Int(byte >> 4)])
                out.append(hex[Int(byte & 0xF)])
            default:
                // UTF-8 bytes ≥ 0x80 pass as they are (the string is valid UTF-8).
                out.append(byte)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}

/// Appends audit records as JSON lines to a file (created 0600), to stderr, or to syslog.
///
/// Records written on a SwiftNIO event loop are batched until the loop has handled its
/// current round of I/O (one `write(2)` for many requests instead of one each); a warning
/// or error record is written at once, after whatever was batched before it. Records from
/// any other thread are written at once. `flush()` writes what is pending. `reopen()` (on
/// SIGUSR1) reopens the file, for logrotate.
public final class AuditLog: Sendable {
    private enum Sink {
        case stderr
        case file(path: String)
        /// RFC 3164 datagrams to the local syslog socket (`/dev/log`, where journald listens
        /// too), one record each, facility daemon, severity from the record's level.
        case syslog(socket: String)
        /// Nowhere (the SDK's records go to its observers only).
        case discard
    }

    private let sink: Sink
    private struct State {
        var fd: Int32
        var bytes: [UInt8] = []
        var flushScheduled = false
        var timestamps = AuditRecord.TimestampCache()
    }
    private let state: Mutex<State>
    private let observers = Mutex<[@Sendable (AuditRecord) -> Void]>([])
    /// How many observers there are: a record skips the observers' lock when none is.
    private let observerCount = Atomic<Int>(0)
    /// A batch larger than this is written without waiting for the end of the round.
    static let batchLimit = 64 << 10

    /// Writes to standard error.
    public init() {
        sink = .stderr
        state = Mutex(State(fd: 2))
    }

    /// Writes nowhere; records reach only the observers (`addObserver`).
    public static func discarding() -> AuditLog { AuditLog(sink: .discard) }

    private init(sink: Sink) {
        self.sink = sink
        state = Mutex(State(fd: -1))
    }

    /// Calls `observer` with every record written from now on, on the writing thread (an
    /// event loop: keep it short).
    public func addObserver(_ observer: @escaping @Sendable (AuditRecord) -> Void) {
        observers.withLock {
            $0.append(observer)
            observerCount.store($0.count, ordering: .releasing)
        }
    }

    /// `path`: a file, or `syslog` for the local syslog socket.
    public init(path: String) throws(ProxyError) {
        if path == "syslog" {
            let socketPath = ProcessInfo.processInfo.environment["KEYHOLE_SYSLOG_SOCKET"] ?? "/dev/log"
            sink = .syslog(socket: socketPath)
            state = Mutex(State(fd: -1))
            return
        }
        let opened = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard opened >= 0 else { throw .auditLog(path: path, reason: String(cString: strerror(errno))) }
        sink = .file(path: path)
        state = Mutex(State(fd: opened))
    }

    deinit {
        flush()
        state.withLock { if $0.fd > 2 { close($0.fd) } }
    }

    public func write(_ record: AuditRecord) {
        if observerCount.load(ordering: .acquiring) > 0 {
            for observer in observers.withLock({ $0 }) { observer(record) }
        }
        emit(record.level) { record.appendFieldsAfterTime(to: &$0) }
    }

    /// Whether `write(info:)` may be used: nobody observes records (observers are given
    /// records, which preformatted bytes are not).
    var takesPreformatted: Bool { observerCount.load(ordering: .acquiring) == 0 }

    /// An `info` record given as the bytes `AuditRecord.appendFieldsAfterTime` made for it,
    /// for a writer that writes the same record again and again (a keep-alive connection's
    /// substitutions): the line is its time and these bytes. Only when `takesPreformatted`.
    func write(info fieldsAfterTime: [UInt8]) {
        emit(.info) { $0 += fieldsAfterTime }
    }

    /// One line: the time, then what `appendFields` appends (the newline included).
    private func emit(_ level: AuditRecord.Level, _ appendFields: (inout [UInt8]) -> Void) {
        if case .discard = sink { return }
        if case .file = sink, level == .info, let loop = MultiThreadedEventLoopGroup.currentEventLoop {
            // The common case (a substitution on an event loop): formatted straight into the
            // batch, written out after the loop's current work.
            let time = Date()
            let schedule: Bool = state.withLock { state in
                AuditRecord.appendTimeField(time, to: &state.bytes, cache: &state.timestamps)
                appendFields(&state.bytes)
                guard state.bytes.count < Self.batchLimit else {
                    Self.writeOut(&state)
                    return false
                }
                defer { state.flushScheduled = true }
                return !state.flushScheduled
            }
            if schedule { loop.execute { [self] in self.flush() } }
            return
        }
        var line: [UInt8] = []
        var timestamps = AuditRecord.TimestampCache()
        AuditRecord.appendTimeField(Date(), to: &line, cache: &timestamps)
        appendFields(&line)
        if case .syslog(let socket) = sink {
            line.removeLast()  // the newline
            let severity = level == .error ? 3 : level == .warn ? 4 : 6
            state.withLock { Self.sendSyslog(line, severity: severity, socket: socket, fd: &$0.fd) }
            return
        }
        let loop = level == .info ? MultiThreadedEventLoopGroup.currentEventLoop : nil
        let schedule: Bool = state.withLock { state in
            state.bytes += line
            guard loop != nil, state.bytes.count < Self.batchLimit else {
                Self.writeOut(&state)
                return false
            }
            defer { state.flushScheduled = true }
            return !state.flushScheduled
        }
        if schedule, let loop {
            loop.execute { [self] in self.flush() }
        }
    }

    /// Writes every pending record.
    public func flush() {
        state.withLock { state in
            state.flushScheduled = false
            Self.writeOut(&state)
        }
    }

    /// Writes what is pending, then reopens the file (logrotate moved it away): later
    /// records go to a new file at the same path. Does nothing for stderr and syslog.
    public func reopen() throws(ProxyError) {
        guard case .file(let path) = sink else { return }
        let opened = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard opened >= 0 else { throw .auditLog(path: path, reason: String(cString: strerror(errno))) }
        state.withLock { state in
            Self.writeOut(&state)
            close(state.fd)
            state.fd = opened
        }
    }

    private static func writeOut(_ state: inout State) {
        guard !state.bytes.isEmpty else { return }
        state.bytes.withUnsafeBytes { _ = FileBytes.writeAll(state.fd, $0) }
        state.bytes.removeAll(keepingCapacity: true)
    }

    /// `<PRI>keyhole[PID]: MESSAGE` on a connected datagram socket, reconnected when the
    /// syslog daemon restarted.
    private static func sendSyslog(_ message: [UInt8], severity: Int, socket path: String, fd: inout Int32) {
        let datagram = Array("<\(3 * 8 + severity)>keyhole[\(getpid())]: ".utf8) + message
        for _ in 0..<2 {
            if fd < 0 { fd = UnixDatagram.connect(path) }
            guard fd >= 0 else { return }
            let sent = datagram.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
            if sent >= 0 { return }
            close(fd)
            fd = -1
        }
    }
}

/// The error type of `KeyholeProxy`.
public enum ProxyError: Error, Sendable, CustomStringConvertible {
    case auditLog(path: String, reason: String)
    case listen(address: String, reason: String)
    case metrics(address: String, reason: String)
    case tls(String)

    public var description: String {
        switch self {
        case .auditLog(let path, let reason): return "cannot open audit log \(path): \(reason)"
        case .listen(let address, let reason): return "cannot listen on \(address): \(reason)"
        case .metrics(let address, let reason): return "cannot serve metrics on \(address): \(reason)"
        case .tls(let reason): return reason
        }
    }
}
