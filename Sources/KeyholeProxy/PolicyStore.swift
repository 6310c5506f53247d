import KeyholeEngine
import KeyholePolicy
import NIOCore
import Synchronization

/// The running policy and its reloads, and the form connections use it in: one
/// `PolicySnapshot` (the policy with its secrets compiled) per event loop and generation,
/// made when the loop's first connection asks, so a loop's connections share it and loops
/// share no reference counts. A reload starts a new generation and drops the snapshots.
final class PolicyStore: Sendable {
    private struct State {
        var policy: Policy
        /// One more at every reload.
        var generation: UInt64
        var snapshots: [ObjectIdentifier: PolicySnapshot] = [:]
    }

    private let state: Mutex<State>

    init(_ policy: Policy) {
        state = Mutex(State(policy: policy, generation: 0))
    }

    var policy: Policy { state.withLock { $0.policy } }
    var generation: UInt64 { state.withLock { $0.generation } }

    /// The policy, its generation and its secrets compiled, for connections on `loop` (read
    /// together: a reload in between cannot pair one policy with another's secrets).
    func snapshot(on loop: any EventLoop) -> PolicySnapshot {
        let key = ObjectIdentifier(loop)
        let (policy, generation, snapshot) = state.withLock { ($0.policy, $0.generation, $0.snapshots[key]) }
        if let snapshot { return snapshot }
        // Compiled outside the lock; kept unless a reload came meanwhile.
        let made = PolicySnapshot(policy: policy, generation: generation, secrets: SecretSet(policy.secrets))
        state.withLock { state in
            if state.generation == generation { state.snapshots[key] = made }
        }
        return made
    }

    /// A reload: the next generation, no snapshot of the old one handed out again.
    func replace(_ policy: Policy) {
        state.withLock { $0 = State(policy: policy, generation: $0.generation + 1) }
    }
}

/// A policy as its connections use it: the policy, its generation (one more at every
/// reload) and its secrets compiled. Immutable; one per event loop and generation
/// (`PolicyStore.snapshot(on:)`), referenced by each session.
final class PolicySnapshot: Sendable {
    let policy: Policy
    let generation: UInt64
    let secrets: SecretSet

    init(policy: Policy, generation: UInt64, secrets: SecretSet) {
        self.policy = policy
        self.generation = generation
        self.secrets = secrets
    }
}
