import NIOCore
import NIOEmbedded
import Testing

@testable import KeyholeProxy

/// What an upstream sends before the session is set up (a banner) is held, announced once,
/// and passed on in order on release. (That reading stops meanwhile is an `autoRead`
/// switch, which EmbeddedChannel does not model; the end-to-end tests cover it.)
@Suite("Upstream hold")
struct UpstreamHoldHandlerTests {
    final class Collector: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        var received: [String] = []
        var inactive = false
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { received.append(String(buffer: unwrapInboundIn(data))) }
        func channelInactive(context: ChannelHandlerContext) { inactive = true }
    }

    @Test func aBannerIsHeldAnnouncedAndReleasedInOrder() throws {
        var announced = 0
        let hold = UpstreamHoldHandler(onFirstBytes: { announced += 1 })
        let collector = Collector()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(hold)
        try channel.pipeline.syncOperations.addHandler(collector)
        try channel.connect(to: SocketAddress(ipAddress: "203.0.113.10", port: 25)).wait()
        try channel.writeInbound(ByteBuffer(string: "220 smtp.example.test ESMTP\r\n"))
        try channel.writeInbound(ByteBuffer(string: "220-more\r\n"))
        #expect(announced == 1)
        #expect(collector.received.isEmpty)
        hold.release()
        #expect(collector.received == ["220 smtp.example.test ESMTP\r\n", "220-more\r\n"])
        #expect(throws: (any Error).self) { try channel.pipeline.syncOperations.handler(type: UpstreamHoldHandler.self) }
        try channel.writeInbound(ByteBuffer(string: "after\r\n"))
        #expect(collector.received.last == "after\r\n")
        _ = try channel.finish()
    }

    @Test func aCloseMeanwhileIsPassedOnAfterTheBytes() throws {
        let hold = UpstreamHoldHandler(onFirstBytes: {})
        let collector = Collector()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(hold)
        try channel.pipeline.syncOperations.addHandler(collector)
        try channel.connect(to: SocketAddress(ipAddress: "203.0.113.10", port: 25)).wait()
        try channel.writeInbound(ByteBuffer(string: "bye\r\n"))
        channel.pipeline.fireChannelInactive()
        #expect(!collector.inactive)
        hold.release()
        #expect(collector.received == ["bye\r\n"])
        #expect(collector.inactive)
    }
}
