public import Foundation
import KeyholePolicy
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

    public init(
        level: Level, event: String, sandbox: String, connection: UInt64, secret: String? = nil, site: String? = nil,
        form: String? = nil, reason: String? = nil, action: String? = nil, sni: String? = nil, host: String? = nil,
        destination: String? = nil, method: String? = nil, path: String? = nil, detail: String? = nil
    ) {
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

    /// One JSON object on one line.
    public func jsonLine(time: Date = Date()) -> String {
        var fields: [(String, String?)] = [
            ("time", AuditRecord.timestamp(time)), ("level", level.rawValue), ("sandbox", sandbox),
            ("connection", String(connection)), ("event", event), ("secret", secret), ("site", site), ("form", form),
            ("reason", reason), ("action", action), ("sni", sni), ("host", host), ("destination", destination),
            ("method", method), ("path", path), ("detail", detail),
        ]
        fields = fields.filter { $0.1 != nil }
        return "{" + fields.map { "\"\($0.0)\":" + ($0.0 == "connection" ? $0.1! : AuditRecord.quote($0.1!)) }.joined(separator: ",") + "}"
    }

    /// One shared (value-type, Sendable) format instead of a formatter per record.
    static let timeFormat = Date.ISO8601FormatStyle(includingFractionalSeconds: true)

    static func timestamp(_ date: Date) -> String { timeFormat.format(date) }

    /// A JSON string literal for `value` (quotes, backslashes and control characters escaped).
    public static func quote(_ value: String) -> String {
        var out = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}

/// Appends audit records as JSON lines to a file (created 0600) or to stderr.
public final class AuditLog: Sendable {
    private let fd: Int32
    private let ownsDescriptor: Bool
    private let lock = Mutex(())

    /// Writes to standard error.
    public init() {
        fd = 2
        ownsDescriptor = false
    }

    public init(path: String) throws(ProxyError) {
        let opened = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard opened >= 0 else { throw .auditLog(path: path, reason: String(cString: strerror(errno))) }
        fd = opened
        ownsDescriptor = true
    }

    deinit {
        if ownsDescriptor { close(fd) }
    }

    public func write(_ record: AuditRecord) {
        let bytes = Array((record.jsonLine() + "\n").utf8)
        lock.withLock { _ in
            bytes.withUnsafeBytes { _ = FileBytes.writeAll(fd, $0) }
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
