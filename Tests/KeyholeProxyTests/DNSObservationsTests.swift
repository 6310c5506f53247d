import KeyholePolicy
import KeyholeProxy
import Testing

@Suite("DNS observations")
struct DNSObservationsTests {
    let address = IPAddress("203.0.113.10")!

    @Test func pinHoldsForTTLPlusGraceOnly() {
        let store = DNSObservations(grace: .seconds(5))
        let t0 = ContinuousClock.now
        #expect(!store.isPinned(name: "api.example.com", address: address, now: t0))
        store.record(name: "API.example.com.", address: address, ttl: 60, now: t0)
        #expect(store.isPinned(name: "api.example.com", address: address, now: t0))
        #expect(store.isPinned(name: "api.example.com", address: address, now: t0 + .seconds(65)))
        #expect(!store.isPinned(name: "api.example.com", address: address, now: t0 + .seconds(66)))
        #expect(!store.isPinned(name: "api.example.com", address: IPAddress("203.0.113.11")!, now: t0))
        #expect(!store.isPinned(name: "other.example.com", address: address, now: t0))
    }

    @Test func mappedAddressesMatchTheirIPv4Form() {
        let store = DNSObservations()
        store.record(name: "a.example.com", address: address, ttl: 30)
        #expect(store.isPinned(name: "a.example.com", address: IPAddress("::ffff:203.0.113.10")!))
        #expect(store.names(for: address) == ["a.example.com"])
    }

    @Test func aShorterLaterTTLDoesNotCutAnEarlierPin() {
        let store = DNSObservations(grace: .zero)
        let t0 = ContinuousClock.now
        store.record(name: "a.example.com", address: address, ttl: 300, now: t0)
        store.record(name: "a.example.com", address: address, ttl: 1, now: t0)
        #expect(store.isPinned(name: "a.example.com", address: address, now: t0 + .seconds(200)))
    }

    @Test func staysBounded() {
        let store = DNSObservations(grace: .zero, capacity: 100)
        let t0 = ContinuousClock.now
        for i in 0..<1000 {
            store.record(name: "n\(i).example.com", address: address, ttl: UInt32(i), now: t0)
        }
        #expect(store.count <= 100)
        // The longest-lived names survive eviction.
        #expect(store.isPinned(name: "n999.example.com", address: address, now: t0))
    }
}
