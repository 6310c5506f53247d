public import NIOCore

/// Decides an upgrade from the request/response pair (BRIEF §4): it reads the upstream's
/// response heads, split anywhere, and answers once the first final response is complete.
/// A `101` whose `Upgrade` names the protocol the request asked for, or a `2xx` to a
/// CONNECT, accepts; any other final response (a `200` to `Upgrade: h2c`, a `426`, a head
/// that is not HTTP or too large) declines, and the connection stays HTTP. Informational
/// responses (`100`, `103`) are skipped. Pure: bytes in, a decision out.
public struct UpgradeDecision: Sendable {
    public enum Outcome: Sendable, Equatable {
        /// Upgraded: the engine relays (and scans) both directions from here on; `protocol`
        /// is the `Upgrade` token of a 101 (lower-cased), nil for CONNECT.
        case accepted(protocol: String?)
        case declined
    }

    /// Largest response head read (as for requests).
    public static let maxHead = 64 * 1024

    let requested: [String]
    let isConnect: Bool
    private var head: [UInt8] = []
    public private(set) var outcome: Outcome?

    /// `upgrade`: the request's `Upgrade` value (comma-separated protocols); `connect`: the
    /// request was a CONNECT.
    public init(upgrade: String?, connect: Bool) {
        requested = (upgrade ?? "").split(separator: ",").map { Self.token($0) }.filter { !$0.isEmpty }
        isConnect = connect
    }

    /// Feeds upstream bytes (which go on to the guest unchanged); returns the outcome once
    /// known. Bytes after the deciding head are not looked at.
    public mutating func feed(_ buffer: ByteBuffer) -> Outcome? {
        guard outcome == nil else { return outcome }
        var view = buffer.readableBytesView[...]
        while outcome == nil, !view.isEmpty {
            // Take bytes up to the end of the current head only.
            var consumed = 0
            var complete = false
            for byte in view {
                head.append(byte)
                consumed += 1
                let n = head.count
                if byte == 0x0A, n >= 4, head[n - 2] == 0x0D, head[n - 3] == 0x0A, head[n - 4] == 0x0D {
                    complete = true
                    break
                }
                if n > Self.maxHead { break }
            }
            view = view.dropFirst(consumed)
            if head.count > Self.maxHead {
                outcome = .declined
            } else if complete {
                decide()
            }
        }
        return outcome
    }

    private mutating func decide() {
        defer { head.removeAll(keepingCapacity: true) }
        // "HTTP/1.x NNN"
        guard head.count >= 12, Array(head[0..<7]) == Array("HTTP/1.".utf8), head[8] == 0x20,
            let status = Int(String(decoding: head[9..<12], as: UTF8.self))
        else {
            outcome = .declined
            return
        }
        if status >= 100 && status < 200 && status != 101 { return }  // informational: the next head decides
        if isConnect {
            outcome = (200..<300).contains(status) ? .accepted(protocol: nil) : .declined
            return
        }
        guard status == 101 else {
            outcome = .declined
            return
        }
        let offered = headerValues("upgrade").flatMap { $0.split(separator: ",").map { Self.token($0) } }
        if let chosen = offered.first(where: { requested.contains($0) }) {
            outcome = .accepted(protocol: chosen)
        } else {
            outcome = .declined
        }
    }

    /// Values of header `name` (lower-case) in the head.
    private func headerValues(_ name: String) -> [String] {
        let text = String(decoding: head, as: UTF8.self)
        var values: [String] = []
        for line in text.split(separator: "\r\n").dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            if line[..<colon].lowercased() == name {
                values.append(String(line[line.index(after: colon)...]))
            }
        }
        return values
    }

    /// A protocol token without its version, lower-cased: `WebSocket` → `websocket`,
    /// `h2c` → `h2c`, `HTTP/2.0` → `http`.
    static func token<S: StringProtocol>(_ text: S) -> String {
        let trimmed = text.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed()
        return String(String(trimmed).split(separator: "/", maxSplits: 1).first ?? "").lowercased()
    }
}
