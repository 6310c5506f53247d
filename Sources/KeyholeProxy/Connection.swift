import Foundation
import KeyholeEngine
import KeyholePolicy
import KeyholeTLS
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS

#if canImport(Glibc)
import Glibc
#endif

/// First in every guest pipeline. Closing through it bypasses TLS, so a reset is a reset
/// (SO_LINGER 0: RST, not FIN) and no close_notify is sent.
final class ResetHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
}

extension Channel {
    /// RST the connection: nothing more is sent, the peer sees "connection reset".
    func reset() {
        eventLoop.assertInEventLoop()
        let channel = self
        let linger = (channel as? any SocketOptionProvider)?.setSoLinger(linger(l_onoff: 1, l_linger: 0))
            ?? eventLoop.makeSucceededVoidFuture()
        linger.assumeIsolated().whenComplete { _ in
            if let context = try? channel.pipeline.syncOperations.context(handlerType: ResetHandler.self) {
                context.close(promise: nil)
            } else {
                channel.close(promise: nil)
            }
        }
    }
}

/// Reads the first bytes of a guest flow and decides what it is: a TLS ClientHello, an
/// HTTP/1.x request, or anything else. Then it builds the rest of both pipelines.
final class FirstFlightHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    enum Kind {
        case tls(serverName: String?)
        case http
        case opaque
    }

    let shared: ProxyShared
    var buffered: ByteBuffer?
    var destination: SocketAddress?
    var timeout: Scheduled<Void>?
    var decided = false
    var timedOut = false

    init(shared: ProxyShared) {
        self.shared = shared
    }

    func channelActive(context: ChannelHandlerContext) {
        let channel = context.channel
        let loopContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        OriginalDestination.of(channel).assumeIsolated().whenComplete { result in
            let context = loopContext.value
            switch result {
            case .success(let address):
                // A flow addressed to the proxy itself was not redirected: nothing to relay to.
                if address == channel.localAddress {
                    channel.reset()
                    return
                }
                // Egress applies to proxied flows too: decided before any upstream connect.
                if case .denied(let rule) = self.shared.egressDecision(for: address) {
                    self.shared.metrics.egressDenied.increment()
                    self.shared.audit.write(
                        AuditRecord(
                            level: .warn, event: "egress-denied", sandbox: self.shared.policy.name, connection: 0, reason: rule,
                            action: "reset", destination: "\(address.keyholeIP?.description ?? "?"):\(address.port ?? 0)"))
                    channel.reset()
                    return
                }
                self.destination = address
                self.maybeDecide(context: context)
            case .failure:
                self.shared.audit.write(
                    AuditRecord(
                        level: .warn, event: "no-original-destination", sandbox: self.shared.policy.name, connection: 0,
                        detail: "the flow was not redirected by netfilter (SO_ORIGINAL_DST unavailable)"))
                channel.reset()
            }
        }
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: shared.configuration.firstFlightTimeout) {
            self.timedOut = true
            self.maybeDecide(context: loopContext.value)
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffered == nil {
            buffered = incoming
        } else {
            buffered!.writeBuffer(&incoming)
        }
        maybeDecide(context: context)
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        context.fireChannelInactive()
    }

    private func classify() -> Kind? {
        guard let buffered, buffered.readableBytes > 0 else { return timedOut ? .opaque : nil }
        let bytes = Array(buffered.readableBytesView.prefix(16 * 1024 + 2048 + 5))
        switch ClientHello.parse(bytes) {
        case .clientHello(let name):
            return .tls(serverName: name)
        case .incomplete:
            return timedOut ? .opaque : nil
        case .notClientHello:
            break
        }
        // HTTP/1.x: a method token of capital letters, then a space.
        var letters = 0
        for byte in bytes.prefix(16) {
            if byte >= 0x41 && byte <= 0x5A {
                letters += 1
                continue
            }
            return byte == 0x20 && letters >= 3 ? .http : .opaque
        }
        return bytes.count >= 16 || timedOut ? .opaque : nil
    }

    private func maybeDecide(context: ChannelHandlerContext) {
        guard !decided, let destination, let kind = classify() else { return }
        decided = true
        timeout?.cancel()
        let session = Session(
            id: shared.newConnectionID(), shared: shared, guest: context.channel, destination: destination, policy: shared.policy)
        session.start(kind: kind, firstFlight: buffered ?? ByteBuffer(), firstFlightHandler: self, context: context)
        buffered = nil
    }
}

/// One guest connection and its upstream: confined to one event loop.
final class Session {
    let id: UInt64
    let shared: ProxyShared
    let guest: any Channel
    let destination: SocketAddress
    let destinationIP: IPAddress?
    let policy: Policy
    var upstream: (any Channel)?
    var rewriter: RequestRewriter?
    var serverName: String?
    /// The host name the upstream's certificate was verified for (a dNSName SAN matching
    /// the SNI, on a chain to a trusted root); nil until then, and for flows with no name.
    var verifiedName: String?
    var output = RewriteOutput()
    var finished = false
    /// Set while a request head is partly received; fires the slowloris defence.
    var headDeadline: Scheduled<Void>?
    var requestsCounted = 0

    init(id: UInt64, shared: ProxyShared, guest: any Channel, destination: SocketAddress, policy: Policy) {
        self.id = id
        self.shared = shared
        self.guest = guest
        self.destination = destination
        self.destinationIP = destination.keyholeIP
        self.policy = policy
    }

    var destinationText: String { "\(destinationIP?.description ?? "?"):\(destination.port ?? 0)" }

    func record(_ level: AuditRecord.Level, _ event: String, reason: String? = nil, action: String? = nil, detail: String? = nil) {
        shared.audit.write(
            AuditRecord(
                level: level, event: event, sandbox: policy.name, connection: id, reason: reason, action: action, sni: serverName,
                destination: destinationText, detail: detail))
    }

    // MARK: Setup

    func start(kind: FirstFlightHandler.Kind, firstFlight: ByteBuffer, firstFlightHandler: FirstFlightHandler, context: ChannelHandlerContext) {
        let loop = context.eventLoop
        let handlerContext = NIOLoopBound(context, eventLoop: loop)
        switch kind {
        case .tls(let name):
            serverName = name.map { HostName.normalize($0) }
            if let name = serverName, policy.network.tlsBypass.allows(name) {
                shared.metrics.connectionsBypass.increment()
                connectUpstream(tls: false).assumeIsolated().whenComplete { result in
                    self.finishSetup(result, relayOnly: true, firstFlight: firstFlight, guestTLS: nil, context: handlerContext.value)
                }
                return
            }
            shared.metrics.connectionsTLS.increment()
            let name = serverName ?? destinationIP?.description ?? "unknown"
            connectUpstream(tls: true).assumeIsolated()
                .flatMap { upstream -> EventLoopFuture<(any Channel, NIOSSLContext)> in
                    let cached = self.shared.tls.hasCachedContext(for: name)
                    if cached { self.shared.metrics.leafCacheHits.increment() } else { self.shared.metrics.leafCacheMisses.increment() }
                    let tls = self.shared.tls
                    // Forging signs a certificate: keep it off the event loop.
                    return self.shared.threadPool.runIfActive(eventLoop: loop) { try tls.serverContext(for: name) }
                        .map { (upstream, $0) }
                }
                .whenComplete { result in
                    switch result {
                    case .success(let (upstream, serverContext)):
                        self.finishSetup(.success(upstream), relayOnly: false, firstFlight: firstFlight, guestTLS: serverContext, context: handlerContext.value)
                    case .failure(let error):
                        self.finishSetup(.failure(error), relayOnly: false, firstFlight: firstFlight, guestTLS: nil, context: handlerContext.value)
                    }
                }
        case .http:
            shared.metrics.connectionsHTTP.increment()
            connectUpstream(tls: false).assumeIsolated().whenComplete { result in
                self.finishSetup(result, relayOnly: false, firstFlight: firstFlight, guestTLS: nil, context: handlerContext.value)
            }
        case .opaque:
            shared.metrics.connectionsOpaque.increment()
            connectUpstream(tls: false).assumeIsolated().whenComplete { result in
                self.finishSetup(result, relayOnly: false, firstFlight: firstFlight, guestTLS: nil, context: handlerContext.value, opaque: true)
            }
        }
    }

    /// Connects to the original destination; with `tls`, completes a verified handshake
    /// with SNI = the guest's server name before returning.
    private func connectUpstream(tls: Bool) -> EventLoopFuture<any Channel> {
        var bootstrap = ClientBootstrap(group: guest.eventLoop)
            .connectTimeout(shared.configuration.connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
        if let mark = shared.configuration.upstreamMark {
            bootstrap = bootstrap.channelOption(
                ChannelOptions.Types.SocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(36)),  // SO_MARK
                value: SocketOptionValue(Int32(bitPattern: mark)))
        }
        let session = self
        let connected = bootstrap.connect(to: destination).assumeIsolated().flatMapErrorThrowing { error -> any Channel in
            session.shared.metrics.upstreamConnectFailures.increment()
            session.record(.warn, "upstream-connect-failed", detail: "\(error)")
            throw error
        }.nonisolated()
        guard tls else { return connected }
        let upstreamContext = shared.tls.upstreamContext
        // Only a valid host name is a name: anything else is sent as no SNI, and the flow
        // has no verified name (no secret can flow on it).
        let hostname = serverName.flatMap { HostName.problem(with: $0) == nil ? $0 : nil }
        return connected.assumeIsolated().flatMap { upstream in
            let handshake = upstream.eventLoop.makePromise(of: Void.self)
            let client: NIOSSLClientHandler
            do {
                client = try NIOSSLClientHandler(context: upstreamContext, serverHostname: hostname)
                try upstream.pipeline.syncOperations.addHandler(client)
                try upstream.pipeline.syncOperations.addHandler(HandshakeWatcher(promise: handshake))
            } catch {
                upstream.close(promise: nil)
                return upstream.eventLoop.makeFailedFuture(error)
            }
            return handshake.futureResult.assumeIsolated().flatMapThrowing { () -> any Channel in
                // The chain verified (NIOSSL, against the trust roots). The name is ours to
                // check: a dNSName SAN matching the SNI, never an iPAddress SAN.
                guard let hostname else { return upstream }
                let problem: String
                if let der = try? client.peerCertificate?.toDERBytes() {
                    guard let found = UpstreamName.problem(certificateDER: der, name: hostname) else {
                        session.verifiedName = hostname
                        return upstream
                    }
                    problem = found
                } else {
                    problem = "the upstream presented no certificate"
                }
                throw UpstreamNameNotVerified(reason: problem)
            }.flatMapError { error in
                session.shared.metrics.upstreamVerifyFailures.increment()
                if let unverified = error as? UpstreamNameNotVerified {
                    session.record(.warn, "upstream-tls-failed", reason: "name-not-verified", detail: unverified.reason)
                } else {
                    session.record(.warn, "upstream-tls-failed", reason: "upstream certificate or handshake rejected", detail: "\(error)")
                }
                upstream.close(promise: nil)
                return upstream.eventLoop.makeFailedFuture(error)
            }.nonisolated()
        }.nonisolated()
    }

    private func finishSetup(
        _ result: Result<any Channel, any Error>, relayOnly: Bool, firstFlight: ByteBuffer, guestTLS: NIOSSLContext?,
        context: ChannelHandlerContext, opaque: Bool = false
    ) {
        guard case .success(let upstream) = result, guest.isActive else {
            if case .success(let upstream) = result { upstream.close(promise: nil) }
            guest.reset()
            return
        }
        self.upstream = upstream
        do {
            let guestPipeline = guest.pipeline.syncOperations
            let upstreamPipeline = upstream.pipeline.syncOperations
            if relayOnly {
                try guestPipeline.addHandler(GuestSideHandler(session: self), position: .last)
            } else {
                if let guestTLS {
                    try guestPipeline.addHandler(NIOSSLServerHandler(context: guestTLS), position: .after(context.handler))
                }
                let identity = makeIdentity(tls: guestTLS != nil)
                rewriter = RequestRewriter(identity: identity, secrets: policy.secrets, mode: opaque ? .opaque : .http)
                try guestPipeline.addHandler(GuestSideHandler(session: self), position: .last)
            }
            if let watcher = try? upstreamPipeline.handler(type: HandshakeWatcher.self) {
                upstreamPipeline.removeHandler(watcher, promise: nil)
            }
            try upstreamPipeline.addHandler(UpstreamSideHandler(session: self))
            try guestPipeline.addHandler(IdleStateHandler(allTimeout: shared.configuration.idleTimeout), position: .first)
        } catch {
            upstream.close(promise: nil)
            guest.reset()
            return
        }
        // Hand the first bytes to what now follows, then get out of the way.
        if firstFlight.readableBytes > 0 { context.fireChannelRead(NIOAny(firstFlight)) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    private func makeIdentity(tls: Bool) -> ConnectionIdentity {
        guard let destinationIP else { return ConnectionIdentity(sni: nil, dnsPinnedNames: [], upstreamVerified: false) }
        if tls {
            let name = serverName ?? destinationIP.description
            let pinned = serverName.map { shared.dns.isPinned(name: $0, address: destinationIP) } ?? false
            // Verified means: this very name was checked against the upstream's certificate.
            return ConnectionIdentity(sni: name, dnsPinnedNames: pinned ? [name] : [], upstreamVerified: verifiedName != nil && verifiedName == serverName)
        }
        return ConnectionIdentity(sni: nil, dnsPinnedNames: Set(shared.dns.names(for: destinationIP)), upstreamVerified: false)
    }

    // MARK: Data

    func fromGuest(_ buffer: ByteBuffer) {
        guard let upstream, !finished else { return }
        guard let rewriter else {
            // TLS bypass: relay untouched.
            shared.metrics.bytesUpstream.increment(by: Int64(buffer.readableBytes))
            upstream.writeAndFlush(buffer, promise: nil)
            return
        }
        rewriter.consume(buffer, into: &output)
        deliver(rewriter)
        watchHead(rewriter)
    }

    /// A head that started arriving must finish within `headTimeout`, however slowly the
    /// bytes drip in.
    private func watchHead(_ rewriter: RequestRewriter) {
        guard !finished else { return }
        if rewriter.isReadingHead {
            guard headDeadline == nil else { return }
            let loopSelf = NIOLoopBound(self, eventLoop: guest.eventLoop)
            headDeadline = guest.eventLoop.scheduleTask(in: shared.configuration.headTimeout) {
                let session = loopSelf.value
                session.headDeadline = nil
                guard !session.finished, session.rewriter?.isReadingHead == true else { return }
                session.record(.warn, "slow-request-head", reason: "request head not complete in time", action: "reset")
                session.abort()
            }
        } else {
            headDeadline?.cancel()
            headDeadline = nil
        }
    }

    func fromUpstream(_ buffer: ByteBuffer) {
        guard !finished else { return }
        if let rewriter, rewriter.status == .awaitingUpgradeDecision {
            let head = buffer.getString(at: buffer.readerIndex, length: min(12, buffer.readableBytes)) ?? ""
            if head == "HTTP/1.1 101" || head == "HTTP/1.0 101" || (head.hasPrefix("HTTP/1.") && head.dropFirst(9).hasPrefix("2")) {
                rewriter.upgradeAccepted(into: &output)
            } else {
                rewriter.upgradeDeclined(into: &output)
            }
            deliver(rewriter)
        }
        shared.metrics.bytesDownstream.increment(by: Int64(buffer.readableBytes))
        guest.writeAndFlush(buffer, promise: nil)
    }

    private func deliver(_ rewriter: RequestRewriter) {
        guard let upstream else { return }
        if output.requests > requestsCounted {
            shared.metrics.requests.increment(by: Int64(output.requests - requestsCounted))
            requestsCounted = output.requests
        }
        if !output.upstream.isEmpty {
            var total = 0
            for piece in output.upstream {
                total += piece.readableBytes
                upstream.write(piece, promise: nil)
            }
            upstream.flush()
            shared.metrics.bytesUpstream.increment(by: Int64(total))
            output.upstream.removeAll(keepingCapacity: true)
        }
        if output.continueToGuest {
            output.continueToGuest = false
            guest.writeAndFlush(ByteBuffer(string: "HTTP/1.1 100 Continue\r\n\r\n"), promise: nil)
        }
        if !output.events.isEmpty {
            let events = output.events
            output.events.removeAll(keepingCapacity: true)
            for event in events { handle(event) }
        }
        if rewriter.status == .blocked { abort() }
    }

    private func handle(_ event: RewriteEvent) {
        switch event {
        case .substituted(let secret, let site, let request):
            shared.metrics.substitution(secret: secret, site: site.rawValue)
            shared.audit.write(
                AuditRecord(
                    level: .info, event: "substituted", sandbox: policy.name, connection: id, secret: secret, site: site.rawValue,
                    sni: serverName, host: request.host, destination: destinationText, method: request.method, path: request.path))
        case .violation(let violation):
            let action = policy.network.onSecretViolation
            switch action {
            case .block: shared.metrics.violationsBlock.increment()
            case .blockAndLog: shared.metrics.violationsLog.increment()
            case .blockAndTerminate: shared.metrics.violationsTerminate.increment()
            }
            if action != .block {
                shared.audit.write(
                    AuditRecord(
                        level: action == .blockAndLog ? .warn : .error, event: "violation", sandbox: policy.name, connection: id,
                        secret: violation.secret, site: violation.site.rawValue, form: violation.form.rawValue,
                        reason: violation.reason.rawValue, action: action.rawValue, sni: serverName, host: violation.request?.host,
                        destination: destinationText, method: violation.request?.method, path: violation.request?.path))
            }
            if action == .blockAndTerminate {
                shared.onTerminate("secret \(violation.secret) was sent to \(violation.request?.host ?? serverName ?? destinationText) (\(violation.reason.rawValue))")
            }
        case .hostMismatch(let request):
            shared.metrics.hostMismatches.increment()
            shared.audit.write(
                AuditRecord(
                    level: .warn, event: "host-mismatch", sandbox: policy.name, connection: id,
                    reason: rewriter?.identity.isTLS == true ? "host-not-sni" : "authority-not-host", action: "reset",
                    sni: serverName, host: request?.host, destination: destinationText, method: request?.method, path: request?.path,
                    detail: "the Host header (or the target's authority) names another host than the TLS server name: domain fronting is refused"))
        case .framingError(let error, let request):
            shared.metrics.framingErrors.increment()
            shared.audit.write(
                AuditRecord(
                    level: .warn, event: "framing-error", sandbox: policy.name, connection: id, reason: error.rawValue,
                    action: "reset", sni: serverName, host: request?.host, destination: destinationText, method: request?.method,
                    path: request?.path, detail: error.explanation))
        }
    }

    /// A violation or broken framing: reset the guest, drop the upstream.
    func abort() {
        guard !finished else { return }
        finished = true
        headDeadline?.cancel()
        upstream?.close(promise: nil)
        guest.reset()
    }

    func guestClosed() {
        guard !finished else { return }
        if let rewriter {
            rewriter.finish(into: &output)
            deliver(rewriter)
        }
        finished = true
        upstream?.close(promise: nil)
    }

    func upstreamClosed() {
        guard !finished else { return }
        finished = true
        guest.close(promise: nil)
    }
}

/// Guest side, after TLS (if any): bytes into the engine.
final class GuestSideHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let session: Session

    init(session: Session) {
        self.session = session
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session.fromGuest(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        session.guestClosed()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // A slow guest: stop reading from the upstream until the guest drains.
        session.upstream?.setOption(.autoRead, value: context.channel.isWritable).whenFailure { _ in }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            session.abort()
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A peer that closes without close_notify is common and harmless: just close.
        if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl {
            session.guestClosed()
            return
        }
        // Typically the guest refused the forged certificate (it does not trust the CA).
        session.record(.warn, "guest-error", detail: "\(error)")
        session.abort()
    }
}

/// Upstream side: bytes back to the guest, unchanged.
final class UpstreamSideHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let session: Session

    init(session: Session) {
        self.session = session
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session.fromUpstream(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        session.upstreamClosed()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // A slow upstream: stop reading from the guest until the upstream drains.
        session.guest.setOption(.autoRead, value: context.channel.isWritable).whenFailure { _ in }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl {
            session.upstreamClosed()
            return
        }
        session.record(.warn, "upstream-error", detail: "\(error)")
        session.abort()
    }
}

/// The upstream's chain verified, but its certificate does not name the SNI as a DNS name.
struct UpstreamNameNotVerified: Error, CustomStringConvertible {
    let reason: String
    var description: String { reason }
}

/// Completes when the upstream TLS handshake (with full verification) completes.
final class HandshakeWatcher: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<Void>
    var done = false

    init(promise: EventLoopPromise<Void>) {
        self.promise = promise
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event, !done {
            done = true
            promise.succeed()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !done {
            done = true
            promise.fail(error)
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !done {
            done = true
            promise.fail(ChannelError.eof)
        }
        context.fireChannelInactive()
    }
}
