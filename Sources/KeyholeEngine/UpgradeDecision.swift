/// How an upgrade (or CONNECT) request was answered. `ResponseMasker` decides it from the
/// request/response pair (BRIEF §4): a `101` whose `Upgrade` names the protocol the request
/// asked for, or a `2xx` to a CONNECT, accepts; any other final response (a `200` to
/// `Upgrade: h2c`, a `426`) declines, and the connection stays HTTP. A `101` nobody asked
/// for, or to another protocol, resets the connection.
public enum UpgradeDecision {
    public enum Outcome: Sendable, Equatable {
        /// Upgraded: the engine relays (and scans) both directions from here on; `protocol`
        /// is the `Upgrade` token of a 101 (lower-cased), nil for CONNECT.
        case accepted(protocol: String?)
        case declined
    }

    /// A protocol token without its version, lower-cased: `WebSocket` → `websocket`,
    /// `h2c` → `h2c`, `HTTP/2.0` → `http`.
    static func token<S: StringProtocol>(_ text: S) -> String {
        String(text.trimmingSpaces().split(separator: "/", maxSplits: 1).first ?? "").lowercased()
    }
}
