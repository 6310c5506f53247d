import KeyholeNetfilter
public import KeyholePolicy
public import KeyholeProxy
public import NIOCore
import NIOPosix

/// Resolves the hosts of guests' `CONNECT` requests through the resolvers Keyhole trusts
/// (`network.dns`, else the host's): an A and an AAAA query over UDP to the first of them,
/// from a fresh socket with random ids, answers accepted only from that resolver, for that
/// question (CNAME chains followed by `DNSMessage`). What does not answer within `timeout`
/// counts as no address.
public struct TrustedResolver: TunnelResolver {
    public let servers: [IPAddress]
    public var timeout: TimeAmount

    public init(servers: [IPAddress], timeout: TimeAmount = .seconds(3)) {
        self.servers = servers
        self.timeout = timeout
    }

    public func resolve(_ name: String, on eventLoop: any EventLoop) -> EventLoopFuture<[(address: IPAddress, ttl: UInt32)]> {
        let promise = eventLoop.makePromise(of: [(address: IPAddress, ttl: UInt32)].self)
        let ids = [UInt16.random(in: 0...UInt16.max), UInt16.random(in: 0...UInt16.max)]
        guard let server = servers.first, let serverAddress = try? SocketAddress(ipAddress: server.description, port: 53),
            let queryA = DNSMessage.query(id: ids[0], name: name, ipv6: false), let queryAAAA = DNSMessage.query(id: ids[1], name: name, ipv6: true)
        else {
            promise.succeed([])
            return promise.futureResult
        }
        let timeout = self.timeout
        DatagramBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        DNSQueryHandler(name: name, ids: ids, server: serverAddress, timeout: timeout, promise: promise))
                }
            }
            .bind(host: server.isIPv4 ? "0.0.0.0" : "::", port: 0)
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    for query in [queryA, queryAAAA] {
                        channel.writeAndFlush(AddressedEnvelope(remoteAddress: serverAddress, data: ByteBuffer(bytes: query)), promise: nil)
                    }
                case .failure:
                    promise.succeed([])
                }
            }
        return promise.futureResult
    }
}

/// Collects the answers to one name's A and AAAA queries, then closes its socket.
final class DNSQueryHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    let name: String
    var pending: Set<UInt16>
    let server: SocketAddress
    let timeout: TimeAmount
    let promise: EventLoopPromise<[(address: IPAddress, ttl: UInt32)]>
    var found: [(address: IPAddress, ttl: UInt32)] = []
    var deadline: Scheduled<Void>?
    var done = false

    init(name: String, ids: [UInt16], server: SocketAddress, timeout: TimeAmount, promise: EventLoopPromise<[(address: IPAddress, ttl: UInt32)]>) {
        self.name = HostName.normalize(name)
        pending = Set(ids)
        self.server = server
        self.timeout = timeout
        self.promise = promise
    }

    func channelActive(context: ChannelHandlerContext) {
        let loopContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        deadline = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { self.finish(loopContext.value) }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        // Only the resolver asked, about this very question, with an id of ours.
        guard envelope.remoteAddress == server, let answer = try? DNSMessage.parseResponse(Array(envelope.data.readableBytesView)),
            pending.contains(answer.transactionID), answer.queriedName == name
        else { return }
        pending.remove(answer.transactionID)
        found += answer.addresses.map { ($0.address, $0.ttl) }
        if pending.isEmpty { finish(context) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(context)
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(context)
        context.fireChannelInactive()
    }

    private func finish(_ context: ChannelHandlerContext) {
        guard !done else { return }
        done = true
        deadline?.cancel()
        promise.succeed(found)
        context.close(promise: nil)
    }
}

@available(*, unavailable) extension DNSQueryHandler: Sendable {}
