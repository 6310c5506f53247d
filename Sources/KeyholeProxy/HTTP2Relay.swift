import KeyholeEngine
import KeyholePolicy
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOSSL
import NIOTLS

/// HTTP/2 on both legs of one intercepted TLS connection (the guest offered `h2`, the
/// upstream chose it). Each guest stream gets a stream of its own on the upstream
/// connection and an `HTTP2Exchange` (the engine's rewriter and masker for that stream);
/// frames other than HEADERS and DATA stay on their own leg (NIOHTTP2 answers SETTINGS and
/// PING and keeps flow control per leg). A violation resets its stream (RST_STREAM
/// CANCEL, audited); block-and-terminate resets the connection.
final class HTTP2Relay {
    let session: Session
    let identity: ConnectionIdentity
    /// Responses are masked on every stream (a secret is allowed for this name), or on the
    /// streams after a substitution happened on this connection.
    let masking: Bool
    var substituted = false
    var upstreamMultiplexer: NIOHTTP2Handler.StreamMultiplexer?

    init(session: Session, identity: ConnectionIdentity, masking: Bool) {
        self.session = session
        self.identity = identity
        self.masking = masking
    }

    /// The guest side's limits against known HTTP/2 attacks (RFC 9113 §10.5): streams,
    /// header list size (the HTTP/1.1 head limit), CONTINUATION runs (CVE-2024-27316),
    /// resets (rapid reset, CVE-2023-44487), control frame floods (SETTINGS, PING), and
    /// the control frames buffered for a guest that does not read.
    static func guestConfiguration() -> NIOHTTP2Handler.Configuration {
        var configuration = NIOHTTP2Handler.Configuration()
        configuration.connection.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: maxConcurrentStreams),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 64 * 1024),
            HTTP2Setting(parameter: .initialWindowSize, value: 65535),
        ]
        configuration.connection.maximumSequentialContinuationFrames = 5
        configuration.connection.maximumBufferedControlFrames = 1000
        configuration.connection.maximumRecentlyResetStreams = 32
        configuration.connection.controlFrameRateLimit.maximumCount = 200
        configuration.connection.controlFrameRateLimit.windowLength = .seconds(10)
        configuration.stream.streamResetFrameRateLimit.maximumCount = 200
        configuration.stream.streamResetFrameRateLimit.windowLength = .seconds(30)
        return configuration
    }

    static let maxConcurrentStreams = 100

    /// The upstream side: no server push (a PUSH_PROMISE is a connection error).
    static func upstreamConfiguration() -> NIOHTTP2Handler.Configuration {
        var configuration = NIOHTTP2Handler.Configuration()
        configuration.connection.initialSettings = [
            HTTP2Setting(parameter: .enablePush, value: 0),
            HTTP2Setting(parameter: .maxConcurrentStreams, value: maxConcurrentStreams),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 64 * 1024),
        ]
        configuration.connection.maximumSequentialContinuationFrames = 5
        configuration.connection.maximumBufferedControlFrames = 1000
        return configuration
    }

    /// Adds the HTTP/2 handlers to both pipelines (the guest's after its TLS handler).
    func install(guestTLS: NIOSSLServerHandler, upstream: any Channel) throws {
        let loop = session.guest.eventLoop
        let loopSelf = NIOLoopBound(self, eventLoop: loop)
        let upstreamHandler = NIOHTTP2Handler(
            mode: .client, eventLoop: loop, connectionConfiguration: Self.upstreamConfiguration().connection,
            streamConfiguration: Self.upstreamConfiguration().stream,
            inboundStreamInitializer: { channel in
                // Server push is off: a stream the upstream opens is closed at once.
                channel.close()
            })
        try upstream.pipeline.syncOperations.addHandler(upstreamHandler)
        try upstream.pipeline.syncOperations.addHandler(HTTP2ConnectionHandler(relay: self, side: .upstream))
        upstreamMultiplexer = try upstreamHandler.syncMultiplexer()

        let guestHandler = NIOHTTP2Handler(
            mode: .server, eventLoop: loop, connectionConfiguration: Self.guestConfiguration().connection,
            streamConfiguration: Self.guestConfiguration().stream,
            inboundStreamInitializer: { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(GuestStreamHandler(relay: loopSelf.value))
                }
            })
        let pipeline = session.guest.pipeline.syncOperations
        try pipeline.addHandler(guestHandler, position: .after(guestTLS))
        try pipeline.addHandler(HTTP2ConnectionHandler(relay: self, side: .guest), position: .after(guestHandler))
    }

    /// Opens the upstream stream for a guest stream.
    func openUpstream(for exchange: StreamExchange) {
        guard let upstreamMultiplexer, !session.finished else {
            exchange.resetGuest(.cancel)
            return
        }
        let loopExchange = NIOLoopBound(exchange, eventLoop: session.guest.eventLoop)
        let promise = session.guest.eventLoop.makePromise(of: (any Channel).self)
        upstreamMultiplexer.createStreamChannel(promise: promise) { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(UpstreamStreamHandler(exchange: loopExchange.value))
            }
        }
        promise.futureResult.assumeIsolated().whenComplete { result in
            switch result {
            case .success(let channel): loopExchange.value.upstreamReady(channel)
            case .failure: loopExchange.value.resetGuest(.cancel)
            }
        }
    }

    // MARK: events

    /// The engine's events for one stream: audited as on HTTP/1.1 (a substitution makes the
    /// connection's later streams masked).
    func handle(_ events: [RewriteEvent]) {
        for event in events {
            if case .substituted = event { substituted = true }
            session.handle(event)
        }
    }

    func handle(_ events: [MaskEvent], stream: StreamExchange) {
        for event in events {
            switch event {
            case .masked(let secret, let site, let form):
                session.shared.metrics.masked(secret: secret, site: site.rawValue, form: form.rawValue)
                session.shared.audit.write(
                    AuditRecord(
                        level: .info, event: "masked", sandbox: session.policy.name, connection: session.id, secret: secret,
                        site: site.rawValue, form: form.rawValue, sni: session.serverName, destination: session.destinationText))
            case .upgrade:
                continue
            case .framingError(let error, let detail):
                session.shared.metrics.responseFramingErrors.increment()
                session.shared.audit.write(
                    AuditRecord(
                        level: .warn, event: error == .valueInResponse ? "value-in-response" : "response-framing-error",
                        sandbox: session.policy.name, connection: session.id, reason: error.rawValue, action: "reset-stream",
                        sni: session.serverName, destination: session.destinationText,
                        detail: "\(error.explanation) (\(detail)); HTTP/2 stream \(stream.guestStreamID)"))
            }
        }
    }

    /// What a violation on a stream does: the stream is reset, unless the action
    /// (block-and-terminate) ends the whole connection.
    func violationEndsConnection(_ events: [RewriteEvent]) -> Bool {
        for case .violation(let violation) in events {
            let own = session.policy.secrets.first { $0.env == violation.secret }?.onViolation
            if session.policy.network.onSecretViolation.stricter(own) == .blockAndTerminate { return true }
        }
        return false
    }
}

@available(*, unavailable)
extension HTTP2Relay: Sendable {}

/// The tail of each leg's connection pipeline: a close or an error ends the session, each
/// read moves the session's idle timer on; the guest's ALPN must have come out as `h2`.
final class HTTP2ConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = Any
    enum Side { case guest, upstream }
    let relay: HTTP2Relay
    let side: Side
    var handshakeDone = false

    init(relay: HTTP2Relay, side: Side) {
        self.relay = relay
        self.side = side
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func channelReadComplete(context: ChannelHandlerContext) {
        relay.session.noteActivity()
        context.fireChannelReadComplete()
    }

    func channelInactive(context: ChannelHandlerContext) {
        switch side {
        case .guest: relay.session.guestClosed()
        case .upstream: relay.session.upstreamClosed()
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if side == .guest {
            if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls {
                handshakeDone = true
            }
            if let tls = event as? TLSUserEvent, case .handshakeCompleted(let chosen) = tls, chosen != "h2" {
                relay.session.record(
                    .warn, "guest-error", reason: "alpn", action: "reset",
                    detail: "the guest offered h2 but its TLS handshake chose \(chosen ?? "no protocol")")
                relay.session.abort()
                return
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        switch side {
        case .guest:
            relay.session.guestFailed(error, handshakeDone: handshakeDone)
        case .upstream:
            if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl {
                relay.session.upstreamClosed()
                return
            }
            relay.session.record(.warn, "upstream-error", detail: "HTTP/2: \(error)")
            relay.session.abort()
        }
    }
}

@available(*, unavailable)
extension HTTP2ConnectionHandler: Sendable {}

/// One guest stream and the upstream stream it goes to.
final class StreamExchange {
    let relay: HTTP2Relay
    let guest: any Channel
    var upstream: (any Channel)?
    let exchange: HTTP2Exchange
    var output = H2Output()
    /// Parts for the upstream stream before it is open.
    var pending: [H2Part] = []
    var requestHeadersSeen = false
    var finalResponseSeen = false
    var responseStarted = false
    /// END_STREAM was written to the guest (the response is whole) / to the upstream.
    var responseEnded = false
    var requestEnded = false
    var closed = false
    let guestStreamID: Int

    init(relay: HTTP2Relay, guest: any Channel) {
        self.relay = relay
        self.guest = guest
        guestStreamID = (try? guest.syncOptions?.getOption(HTTP2StreamChannelOptions.streamID)).map { Int($0) } ?? 0
        let session = relay.session
        var configuration = RewriterConfiguration()
        configuration.identityResponses = relay.masking || relay.substituted
        exchange = HTTP2Exchange(
            identity: relay.identity, secrets: session.secrets, configuration: configuration,
            heldBodyBudget: session.shared.heldBodies, masking: relay.masking || relay.substituted)
    }

    // MARK: guest → upstream

    func fromGuest(_ payload: HTTP2Frame.FramePayload) {
        guard !closed else { return }
        switch payload {
        case .headers(let headers):
            let fields = headers.headers.map { H2Field($0.name, $0.value) }
            if requestHeadersSeen {
                exchange.requestTrailers(fields, into: &output)
            } else {
                requestHeadersSeen = true
                relay.session.shared.metrics.requests.increment()
                exchange.requestHeaders(fields, endStream: headers.endStream, into: &output)
            }
        case .data(let data):
            guard case .byteBuffer(let buffer) = data.data else { return }
            exchange.requestData(buffer, endStream: data.endStream, into: &output)
        case .rstStream(let code):
            // The guest gave up on the stream: so does the upstream.
            exchange.requestAborted()
            resetUpstream(code)
            close()
            return
        default:
            return
        }
        afterRequest()
    }

    private func afterRequest() {
        let events = output.rewriteEvents
        output.rewriteEvents.removeAll(keepingCapacity: true)
        if !events.isEmpty { relay.handle(events) }
        if exchange.requestBlocked {
            output.upstream.removeAll()
            if relay.violationEndsConnection(events) {
                relay.session.abort()
                return
            }
            // The guest's stream first: what the upstream's reset sets off finds it closed.
            // With block_response: http it is answered with a 403 (when nothing of a response
            // went out yet); else reset with CANCEL, not REFUSED_STREAM: clients retry a
            // refused stream by themselves.
            if let answer = relay.session.blockAnswerHTTP2 {
                relay.session.blockAnswerHTTP2 = nil
                if !responseStarted {
                    answerBlocked(reason: answer.reason, body: answer.body)
                    resetUpstream(.cancel)
                    return
                }
            }
            resetGuest(.cancel)
            resetUpstream(.cancel)
            return
        }
        let parts = output.upstream
        output.upstream.removeAll(keepingCapacity: true)
        guard !parts.isEmpty else { return }
        guard let upstream else {
            pending.append(contentsOf: parts)
            return
        }
        write(parts, to: upstream, upstreamSide: true)
    }

    func upstreamReady(_ channel: any Channel) {
        guard !closed else {
            channel.close(promise: nil)
            return
        }
        upstream = channel
        updateReading()
        let parts = pending
        pending = []
        if !parts.isEmpty { write(parts, to: channel, upstreamSide: true) }
    }

    // MARK: upstream → guest

    func fromUpstream(_ payload: HTTP2Frame.FramePayload) {
        guard !closed else { return }
        switch payload {
        case .headers(let headers):
            let fields = headers.headers.map { H2Field($0.name, $0.value) }
            if finalResponseSeen {
                exchange.responseTrailers(fields, into: &output)
            } else {
                if let status = fields.first(where: { $0.name == ":status" })?.value, !status.hasPrefix("1") {
                    finalResponseSeen = true
                }
                exchange.responseHeaders(fields, endStream: headers.endStream, into: &output)
            }
        case .data(let data):
            guard case .byteBuffer(let buffer) = data.data else { return }
            exchange.responseData(buffer, endStream: data.endStream, into: &output)
        case .rstStream(let code):
            resetGuest(code)
            return
        default:
            return
        }
        let session = relay.session
        if output.scannedBytes > 0 {
            session.shared.metrics.responseBytesScanned.increment(by: Int64(output.scannedBytes))
            output.scannedBytes = 0
        }
        let events = output.maskEvents
        output.maskEvents.removeAll(keepingCapacity: true)
        if !events.isEmpty { relay.handle(events, stream: self) }
        let parts = output.guest
        output.guest.removeAll(keepingCapacity: true)
        if !parts.isEmpty {
            responseStarted = true
            write(parts, to: guest, upstreamSide: false)
        }
        if exchange.responseFailed {
            resetGuest(.internalError)
            resetUpstream(.cancel)
        }
    }

    // MARK: writing, flow, closing

    private func write(_ parts: [H2Part], to channel: any Channel, upstreamSide: Bool) {
        var bytes = 0
        for part in parts {
            switch part {
            case .headers(_, endStream: true), .end:
                if upstreamSide { requestEnded = true } else { responseEnded = true }
            default: break
            }
            switch part {
            case .headers(let fields, let endStream):
                let headers = HPACKHeaders(fields.map { ($0.name, $0.value) })
                channel.write(HTTP2Frame.FramePayload.headers(.init(headers: headers, endStream: endStream)), promise: nil)
            case .data(let buffer):
                bytes += buffer.readableBytes
                channel.write(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(buffer), endStream: false)), promise: nil)
            case .end:
                channel.write(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true)), promise: nil)
            }
        }
        channel.flush()
        let metrics = relay.session.shared.metrics
        if upstreamSide { metrics.bytesUpstream.increment(by: Int64(bytes)) } else { metrics.bytesDownstream.increment(by: Int64(bytes)) }
    }

    /// Each side is read while the other can take more (per stream; NIOHTTP2 stops
    /// granting the guest window meanwhile).
    func updateReading() {
        guard !closed else { return }
        // A stream channel does not read again by itself when autoRead comes back on.
        let readGuest = upstream?.isWritable ?? false
        guest.setOption(.autoRead, value: readGuest).whenFailure { _ in }
        if readGuest { guest.read() }
        if let upstream {
            upstream.setOption(.autoRead, value: guest.isWritable).whenFailure { _ in }
            if guest.isWritable { upstream.read() }
        }
    }

    /// `block_response: http`: a 403 with what was blocked and why, then the stream ends
    /// (and, if the guest is still sending, is reset once the answer is out).
    private func answerBlocked(reason: String, body: String) {
        guard !closed else { return }
        closed = true
        responseEnded = true
        let headers = HPACKHeaders([
            (":status", "403"), ("content-type", "application/json"), ("content-length", String(body.utf8.count)),
            ("x-keyhole-blocked", reason),
        ])
        guest.write(HTTP2Frame.FramePayload.headers(.init(headers: headers)), promise: nil)
        let sent = guest.eventLoop.makePromise(of: Void.self)
        guest.writeAndFlush(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer(string: body)), endStream: true)), promise: sent)
        let guest = guest
        let requestWhole = exchange.requestEnded
        sent.futureResult.whenComplete { _ in
            // A guest still sending its body would wait on a stream that reads no more.
            if !requestWhole { guest.writeAndFlush(HTTP2Frame.FramePayload.rstStream(.cancel), promise: nil) }
        }
    }

    func resetGuest(_ code: HTTP2ErrorCode) {
        guard !closed else { return }
        guest.writeAndFlush(HTTP2Frame.FramePayload.rstStream(code), promise: nil)
        close()
    }

    func resetUpstream(_ code: HTTP2ErrorCode) {
        guard let upstream, upstream.isActive else { return }
        upstream.writeAndFlush(HTTP2Frame.FramePayload.rstStream(code), promise: nil)
        upstream.close(promise: nil)
    }

    func close() {
        guard !closed else { return }
        closed = true
        upstream?.close(promise: nil)
        guest.close(promise: nil)
    }

    func guestStreamClosed() {
        if !closed {
            exchange.requestAborted()
            closed = true
            if !requestEnded || !responseEnded { upstream?.close(promise: nil) }
        }
    }

    func upstreamStreamClosed() {
        guard !closed else { return }
        closed = true
        // The upstream's stream ended. A whole response goes on being written to the guest
        // (its stream closes when that is done); one cut short resets the guest's stream.
        if !responseEnded { guest.close(promise: nil) }
    }
}

@available(*, unavailable)
extension StreamExchange: Sendable {}

/// The guest's stream channel: frames into its `StreamExchange`.
final class GuestStreamHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload
    let relay: HTTP2Relay
    var exchange: StreamExchange?

    init(relay: HTTP2Relay) {
        self.relay = relay
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let exchange = StreamExchange(relay: relay, guest: context.channel)
        self.exchange = exchange
        // Nothing is read until the upstream stream exists.
        context.channel.setOption(.autoRead, value: false).whenFailure { _ in }
        relay.openUpstream(for: exchange)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        exchange?.fromGuest(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        exchange?.guestStreamClosed()
        exchange = nil
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange?.updateReading()
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A stream error (NIOHTTP2 resets the stream itself): the upstream's goes too.
        exchange?.resetUpstream(.cancel)
        exchange?.close()
    }
}

@available(*, unavailable)
extension GuestStreamHandler: Sendable {}

/// The upstream stream channel: frames back into its `StreamExchange`.
final class UpstreamStreamHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload
    let exchange: StreamExchange

    init(exchange: StreamExchange) {
        self.exchange = exchange
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        exchange.fromUpstream(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        exchange.upstreamStreamClosed()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange.updateReading()
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        exchange.resetGuest(.internalError)
    }
}

@available(*, unavailable)
extension UpstreamStreamHandler: Sendable {}
