import Synchronization

/// The bytes all connections of a process may hold at once for body substitution (a
/// `Content-Length` body is held until complete, so its length can be rewritten). One
/// guest opening many connections with large bodies cannot take the appliance's memory:
/// a body that does not fit is refused (`held-body-budget-exhausted`), never sent with a
/// wrong length.
public final class HeldBodyBudget: Sendable {
    public let limit: Int
    private let used = Atomic<Int>(0)

    public init(limit: Int) {
        self.limit = limit
    }

    /// Takes `bytes` from the budget; false (and nothing taken) when they do not fit.
    public func reserve(_ bytes: Int) -> Bool {
        var current = used.load(ordering: .relaxed)
        while true {
            guard current + bytes <= limit else { return false }
            let (exchanged, original) = used.compareExchange(expected: current, desired: current + bytes, ordering: .relaxed)
            if exchanged { return true }
            current = original
        }
    }

    public func release(_ bytes: Int) {
        used.subtract(bytes, ordering: .relaxed)
    }

    public var inUse: Int { used.load(ordering: .relaxed) }
}
