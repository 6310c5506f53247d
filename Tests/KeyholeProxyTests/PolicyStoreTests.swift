import KeyholeEngine
import KeyholePolicy
import NIOEmbedded
import Testing

@testable import KeyholeProxy

/// Connections get the policy through a snapshot per event loop: shared on a loop, never
/// shared between loops, and never one from before a reload.
@Suite("Policy store")
struct PolicyStoreTests {
    static func policy(allowing hosts: [String]) -> Policy {
        Policy(
            name: "test",
            secrets: [Secret(env: "TOKEN", value: SecretValue("real-token-value"), allowedHosts: HostAllowList(exact: hosts))])
    }

    @Test func aLoopsConnectionsShareOneSnapshotAndLoopsDoNot() {
        let store = PolicyStore(Self.policy(allowing: ["api.example.com"]))
        let first = EmbeddedEventLoop()
        let second = EmbeddedEventLoop()
        let a = store.snapshot(on: first)
        #expect(store.snapshot(on: first) === a)
        let b = store.snapshot(on: second)
        #expect(b !== a)
        #expect(b.secrets !== a.secrets)
        #expect(a.generation == 0 && b.generation == 0)
        #expect(a.secrets.secrets.map(\.env) == ["TOKEN"])
    }

    @Test func aReloadHandsOutTheNewPolicyOnEveryLoop() {
        let store = PolicyStore(Self.policy(allowing: ["api.example.com"]))
        let loops = [EmbeddedEventLoop(), EmbeddedEventLoop()]
        let before = loops.map { store.snapshot(on: $0) }
        store.replace(Self.policy(allowing: ["other.example.com"]))
        #expect(store.generation == 1)
        for (loop, old) in zip(loops, before) {
            let now = store.snapshot(on: loop)
            #expect(now !== old)
            #expect(now.generation == 1)
            let compiled = now.secrets.secrets[0]
            #expect(compiled.allowedHosts.allows("other.example.com") && !compiled.allowedHosts.allows("api.example.com"))
            #expect(store.snapshot(on: loop) === now)
        }
        // What connections made before the reload hold is the old policy, unchanged.
        #expect(before[0].secrets.secrets[0].allowedHosts.allows("api.example.com"))
    }
}
