public import NIOCore
import NIOHTTP1
import NIOPosix

/// Serves `GET /metrics` in Prometheus text format, and `GET /healthz`: 200 when every
/// health check passes, 503 otherwise, one `check: ok|FAILED` line each.
public final class MetricsServer: Sendable {
    public typealias HealthChecks = @Sendable () -> [(check: String, ok: Bool)]

    let render: @Sendable () -> String
    let health: HealthChecks
    let group: MultiThreadedEventLoopGroup

    public init(metrics: ProxyMetrics, health: @escaping HealthChecks = { [] }) {
        self.render = { metrics.render() }
        self.health = health
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    public init(registry: MetricsRegistry, health: @escaping HealthChecks = { [] }) {
        self.render = { registry.render() }
        self.health = health
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    public func start(at address: SocketAddress) async throws -> SocketAddress {
        let render = self.render
        let health = self.health
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(render: render, health: health))
                }
            }
        do {
            let channel = try await bootstrap.bind(to: address).get()
            return channel.localAddress ?? address
        } catch {
            throw ProxyError.metrics(address: "\(address)", reason: "\(error)")
        }
    }

    public func stop() async {
        try? await group.shutdownGracefully()
    }
}

final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let render: @Sendable () -> String
    let health: MetricsServer.HealthChecks
    var path = ""

    init(render: @escaping @Sendable () -> String, health: @escaping MetricsServer.HealthChecks) {
        self.render = render
        self.health = health
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            path = head.uri
        case .body:
            break
        case .end:
            let route = path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path
            let status: HTTPResponseStatus
            let body: String
            let type: String
            switch route {
            case "/metrics":
                (status, body, type) = (.ok, render(), "text/plain; version=0.0.4")
            case "/healthz":
                let checks = health()
                let failed = checks.contains { !$0.ok }
                status = failed ? .serviceUnavailable : .ok
                body = checks.map { "\($0.check): \($0.ok ? "ok" : "FAILED")\n" }.joined() + (failed ? "unhealthy\n" : "ok\n")
                type = "text/plain"
            default:
                (status, body, type) = (.notFound, "not found; metrics are at /metrics, health at /healthz\n", "text/plain")
            }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: type)
            headers.add(name: "Content-Length", value: String(body.utf8.count))
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}
