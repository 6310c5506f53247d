import NIOCore
import NIOEmbedded
import Testing

@testable import KeyholeProxy

/// The pool of idle verified upstream connections, without sockets: what it lends to whom,
/// its bounds, and that an idle connection which speaks, closes or times out leaves it.
@Suite("Upstream pool")
struct UpstreamPoolTests {
    let destination = try! SocketAddress(ipAddress: "203.0.113.10", port: 443)

    func entry(_ channel: any Channel, name: String = "api.example.test", h2: Bool = false, generation: UInt64 = 0) -> UpstreamPool.Entry {
        UpstreamPool.Entry(
            channel: channel, serverName: name, offeredHTTP2: h2, applicationProtocol: "http/1.1", since: .now(), generation: generation)
    }

    func connected(_ loop: EmbeddedEventLoop) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel(loop: loop)
        try channel.connect(to: destination).wait()
        return channel
    }

    @Test func aConnectionIsLentOnlyForItsNameDestinationLoopOfferAndPolicyGeneration() throws {
        let loop = EmbeddedEventLoop()
        let pool = UpstreamPool(idleTimeout: .seconds(10))
        let channel = try connected(loop)
        #expect(pool.put(entry(channel), to: destination).isEmpty)
        #expect(pool.hasIdle(to: destination, on: loop))
        let other = try SocketAddress(ipAddress: "203.0.113.11", port: 443)
        #expect(pool.take(to: other, serverName: "api.example.test", offersHTTP2: false, generation: 0, on: loop) == nil)
        #expect(pool.take(to: destination, serverName: "other.example.test", offersHTTP2: false, generation: 0, on: loop) == nil)
        #expect(pool.take(to: destination, serverName: "api.example.test", offersHTTP2: true, generation: 0, on: loop) == nil)
        #expect(pool.take(to: destination, serverName: "api.example.test", offersHTTP2: false, generation: 1, on: loop) == nil)
        #expect(pool.take(to: destination, serverName: "api.example.test", offersHTTP2: false, generation: 0, on: EmbeddedEventLoop()) == nil)
        let taken = pool.take(to: destination, serverName: "api.example.test", offersHTTP2: false, generation: 0, on: loop)
        #expect(taken?.channel === channel)
        // Lent once: it left the pool.
        #expect(pool.take(to: destination, serverName: "api.example.test", offersHTTP2: false, generation: 0, on: loop) == nil)
        #expect(pool.count == 0)
    }

    @Test func thePoolIsBoundedPerDestinationAndInAllOldestFirst() throws {
        let loop = EmbeddedEventLoop()
        let pool = UpstreamPool(idleTimeout: .seconds(10), maxPerDestination: 2, maxTotal: 3)
        let channels = try (0..<4).map { _ in try connected(loop) }
        #expect(pool.put(entry(channels[0]), to: destination).isEmpty)
        #expect(pool.put(entry(channels[1]), to: destination).isEmpty)
        #expect(pool.put(entry(channels[2]), to: destination).map { $0 === channels[0] } == [true])
        let elsewhere = try SocketAddress(ipAddress: "203.0.113.11", port: 443)
        #expect(pool.put(entry(channels[3]), to: elsewhere).isEmpty)
        #expect(pool.count == 3)
        let more = try connected(loop)
        #expect(pool.put(entry(more), to: elsewhere).map { $0 === channels[1] } == [true])
        #expect(pool.count == 3)
    }

    @Test func anIdleConnectionThatSpeaksClosesOrTimesOutLeavesThePool() throws {
        let loop = EmbeddedEventLoop()
        let pool = UpstreamPool(idleTimeout: .seconds(2))
        // It speaks: nothing was asked, so it is closed.
        let speaker = try connected(loop)
        try speaker.pipeline.syncOperations.addHandler(PooledIdleHandler(pool: pool, deadline: loop.now + .seconds(2)))
        _ = pool.put(entry(speaker), to: destination)
        try speaker.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
        #expect(pool.count == 0)
        #expect(!speaker.isActive)
        // It closes.
        let closer = try connected(loop)
        try closer.pipeline.syncOperations.addHandler(PooledIdleHandler(pool: pool, deadline: loop.now + .seconds(2)))
        _ = pool.put(entry(closer), to: destination)
        closer.pipeline.fireChannelInactive()
        #expect(pool.count == 0)
        // It idles past the timeout.
        let idle = try connected(loop)
        try idle.pipeline.syncOperations.addHandler(PooledIdleHandler(pool: pool, deadline: loop.now + .seconds(2)))
        _ = pool.put(entry(idle), to: destination)
        loop.advanceTime(by: .seconds(1))
        #expect(pool.count == 1)
        loop.advanceTime(by: .seconds(2))
        #expect(pool.count == 0)
        #expect(!idle.isActive)
    }

    @Test func drainClosesEveryIdleConnection() throws {
        let loop = EmbeddedEventLoop()
        let pool = UpstreamPool(idleTimeout: .seconds(10))
        let channels = try (0..<3).map { _ in try connected(loop) }
        for channel in channels { _ = pool.put(entry(channel), to: destination) }
        pool.drain()
        #expect(pool.count == 0)
        #expect(channels.allSatisfy { !$0.isActive })
    }
}
