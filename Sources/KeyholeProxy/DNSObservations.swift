public import KeyholePolicy
import Synchronization

/// What the appliance has seen DNS answer: name → addresses, each until its TTL runs out
/// (plus a grace period, because clients cache answers a little longer than the TTL says).
///
/// The proxy asks `isPinned(name:address:)` before substituting: a guest that connects to
/// an address never resolved for the SNI name does not get the real value (BRIEF §4 (c)).
/// The NFQUEUE DNS observer records answers before releasing them to the guest, so the pin
/// exists before the guest's first SYN.
public final class DNSObservations: Sendable {
    public struct Entry: Sendable, Hashable {
        public var name: String
        public var address: IPAddress
        /// Monotonic instant after which the pin no longer holds (TTL + grace).
        public var expires: ContinuousClock.Instant
    }

    public let grace: Duration
    public let capacity: Int
    private let state: Mutex<[String: [IPAddress: ContinuousClock.Instant]]>

    public init(grace: Duration = .seconds(30), capacity: Int = 65_536) {
        self.grace = grace
        self.capacity = capacity
        self.state = Mutex([:])
    }

    /// The longest TTL honoured: a pin never outlives a day, whatever an answer claims.
    public static let maxTTL: UInt32 = 86_400

    /// Records that `name` resolved to `address` with `ttl` seconds to live.
    public func record(name: String, address: IPAddress, ttl: UInt32, now: ContinuousClock.Instant = .now) {
        let key = HostName.normalize(name)
        let expires = now + .seconds(Int64(min(ttl, Self.maxTTL))) + grace
        state.withLock { table in
            if table[key] == nil, table.count >= capacity {
                Self.evict(&table, now: now, capacity: capacity)
            }
            let current = table[key, default: [:]][address.unmapped]
            if current == nil || current! < expires {
                table[key, default: [:]][address.unmapped] = expires
            }
        }
    }

    /// True when an unexpired DNS answer for `name` contained `address`.
    public func isPinned(name: String, address: IPAddress, now: ContinuousClock.Instant = .now) -> Bool {
        let key = HostName.normalize(name)
        return state.withLock { table in
            guard let expires = table[key]?[address.unmapped] else { return false }
            return now <= expires
        }
    }

    /// Names whose unexpired answers contained `address` (for audit events and egress rules).
    public func names(for address: IPAddress, now: ContinuousClock.Instant = .now) -> [String] {
        let address = address.unmapped
        return state.withLock { table in
            table.compactMap { name, addresses in
                addresses[address].map { now <= $0 } == true ? name : nil
            }.sorted()
        }
    }

    public var count: Int { state.withLock { $0.values.reduce(0) { $0 + $1.count } } }

    /// Drops expired pins; if still full, drops the names that expire soonest.
    private static func evict(_ table: inout [String: [IPAddress: ContinuousClock.Instant]], now: ContinuousClock.Instant, capacity: Int) {
        for (name, addresses) in table {
            let live = addresses.filter { now <= $0.value }
            table[name] = live.isEmpty ? nil : live
        }
        guard table.count >= capacity else { return }
        let byExpiry = table.map { ($0.key, $0.value.values.max()!) }.sorted { $0.1 < $1.1 }
        for (name, _) in byExpiry.prefix(table.count - capacity + 1) {
            table[name] = nil
        }
    }
}
