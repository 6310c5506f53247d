import KeyholeEngine
import KeyholePolicy
import KeyholeTLS
import NIOCore
import NIOPosix
import NIOSSL

#if canImport(Glibc)
import Glibc
#endif

/// One guest connection and its upstream: confined to one event loop (so its hot state has
/// no dynamic exclusivity checks: nothing else can reach it while a method runs). Connects upstream as
/// soon as the destination is known, builds the pipelines for what the first flight says
/// (`setUp`), then carries bytes through the engine (`fromGuest`) and back (`fromUpstream`),
/// deciding upgrades from the upstream's response head.
final class Session {
    let id: UInt64
    let shared: ProxyShared
    let guest: any Channel
    let destination: SocketAddress
    let destinationIP: IPAddress?
    /// The policy this session runs under, with its generation and its secrets compiled:
    /// one object shared with the other connections on this event loop (not a copy of the
    /// policy per connection).
    let snapshot: PolicySnapshot
    var policy: Policy { snapshot.policy }
    /// Which reload of the policy this session runs under (pooled connections stay within one).
    var policyGeneration: UInt64 { snapshot.generation }
    var secrets: SecretSet { snapshot.secrets }
    @exclusivity(unchecked) var upstream: (any Channel)?
    @exclusivity(unchecked) var rewriter: RequestRewriter?
    @exclusivity(unchecked) var serverName: String?
    /// The host name the upstream's certificate was verified for (a dNSName SAN matching
    /// the SNI, on a chain to a trusted root); nil until then, and for flows with no name.
    @exclusivity(unchecked) var verifiedName: String?
    @exclusivity(unchecked) var output = RewriteOutput()
    @exclusivity(unchecked) var finished = false
    /// Set while a request head is partly received; fires the slowloris defence.
    @exclusivity(unchecked) var headDeadline: Scheduled<Void>?
    @exclusivity(unchecked) var requestsCounted = 0
    /// The upstream → guest direction of an HTTP connection: response framing (which
    /// decides upgrades) and masking.
    @exclusivity(unchecked) var masker: ResponseMasker?
    @exclusivity(unchecked) var maskOutput = MaskOutput()
    /// With `block_response: http`: the answer to the blocked request, sent instead of a
    /// reset once the engine stops.
    @exclusivity(unchecked) var blockAnswer: ByteBuffer?
    /// The same on HTTP/2: the reason and the JSON body for the blocked stream's `403`.
    var blockAnswerHTTP2: (reason: String, body: String)?
    /// Inside a guest's `CONNECT host:port` tunnel: the host (normalized). A TLS flow in it
    /// must name this host in its SNI.
    var tunnelHost: String?
    /// The guest's ClientHello offers `h2`: so is the upstream (`upstreamProtocol` is what it chose).
    var guestOffersHTTP2 = false
    var upstreamProtocol: String?
    /// Both legs speak HTTP/2.
    weak var http2: HTTP2Relay?
    /// The upstream connection came verified from the pool (no handshake of its own).
    @exclusivity(unchecked) var reusedUpstream = false
    /// A pooled upstream sent something before this session asked it anything.
    var reusedUpstreamSpoke = false
    /// The guest went quiet between requests and its upstream connection went back to the
    /// pool (`detachIfIdle`); the next request takes one again, or connects and verifies anew.
    var detached = false
    /// An upstream connection is being found for a detached session; the guest is not read.
    var reattaching = false
    /// When the upstream was last written to or read from (for `detachIfIdle`).
    @exclusivity(unchecked) var lastUpstreamUse = NIODeadline.now()
    var detachTimer: Scheduled<Void>?
    /// When the guest or the upstream last sent bytes (for the idle timeout).
    @exclusivity(unchecked) var lastActivity = NIODeadline.now()
    var idleTimer: Scheduled<Void>?
    /// The buffers small pieces were last joined in, for each direction (`writeCoalesced`).
    @exclusivity(unchecked) var upstreamJoin: ByteBuffer?
    @exclusivity(unchecked) var guestJoin: ByteBuffer?
    /// The counter of the last substitution counted (the next is most likely the same).
    var substitutionCounter: (secret: String, site: Site, counter: Counter)?
    /// The audit line of the last substitution after its time, and what it was made of: a
    /// keep-alive connection's substitutions mostly repeat it byte for byte. Kept only when
    /// short (`substitutionLineLimit`: a long path is not held for the connection's life) and
    /// dropped when the connection goes quiet.
    var substitutionLine: (secret: String, site: Site, sni: String?, target: RequestSummary.TargetBytes, fields: [UInt8])?
    static let substitutionLineLimit = 512
    /// A reattach's new connection until it is verified (closed if the session ends first).
    var pendingUpstream: (any Channel)?
    var reattachDeadline: Scheduled<Void>?
    /// The upstream connection in use was offered `h2` (what a pool entry records).
    var upstreamOfferedHTTP2 = false

    init(
        id: UInt64, shared: ProxyShared, guest: any Channel, destination: SocketAddress, policy snapshot: PolicySnapshot
    ) {
        self.snapshot = snapshot
        self.id = id
        self.shared = shared
        self.guest = guest
        self.destination = destination
        self.destinationIP = destination.keyholeIP
        self.destinationText = "\(destination.keyholeIP?.description ?? "?"):\(destination.port ?? 0)"
    }

    /// `IP:port`, for audit records (built once).
    let destinationText: String

    func record(_ level: AuditRecord.Level, _ event: String, reason: String? = nil, action: String? = nil, detail: String? = nil) {
        shared.audit.write(
            AuditRecord(
                level: level, event: event, sandbox: policy.name, connection: id, reason: reason, action: action, sni: serverName,
                destination: destinationText, detail: detail))
    }

    // MARK: Setup

    /// TCP to the upstream, on the guest's event loop, marked so the proxy's own rules let it out.
    private func upstreamBootstrap() -> ClientBootstrap {
        let bootstrap = ClientBootstrap(group: guest.eventLoop)
            .connectTimeout(shared.configuration.connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
        guard let mark = shared.configuration.upstreamMark else { return bootstrap }
        return bootstrap.channelOption(
            ChannelOptions.Types.SocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(36)),  // SO_MARK
            value: SocketOptionValue(Int32(bitPattern: mark)))
    }

    /// Connects to the original destination (TCP). Until `setUp` is done, what the upstream
    /// sends is held by an `UpstreamHoldHandler`, which tells `firstFlight` it spoke.
    func connectUpstream(firstFlight: FirstFlightHandler) -> EventLoopFuture<Void> {
        var bootstrap = upstreamBootstrap()
        let loopFirstFlight = NIOLoopBound(firstFlight, eventLoop: guest.eventLoop)
        let loopSelf = NIOLoopBound(self, eventLoop: guest.eventLoop)
        bootstrap = bootstrap.channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(
                    UpstreamHoldHandler(onFirstBytes: { loopFirstFlight.value.upstreamSpoke(from: loopSelf.value) }))
            }
        }
        return bootstrap.connect(to: destination).assumeIsolated().map { channel -> Void in
            if self.finished || !self.guest.isActive {
                channel.close(promise: nil)
                return
            }
            self.upstream = channel
        }.flatMapErrorThrowing { error in
            self.shared.metrics.upstreamConnectFailures.increment()
            self.record(.warn, "upstream-connect-failed", detail: "\(error)")
            throw error
        }.nonisolated()
    }

    /// The first flight was classified before any upstream connect (an idle pooled
    /// connection to this address existed): a TLS flow takes a pooled connection verified
    /// for its server name, if one is still idle; anything else connects now.
    func upstreamForDeferredFlow(kind: FirstFlightStateMachine.Kind, firstFlight: FirstFlightHandler) -> EventLoopFuture<Void> {
        let loop = guest.eventLoop
        guard !finished else { return loop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
        if case .tls(let name?, let offersHTTP2) = kind, tunnelHost == nil {
            let name = HostName.normalize(name)
            if HostName.problem(with: name) == nil, !policy.network.tlsBypass.allows(name),
                let entry = shared.upstreamPool.take(
                    to: destination, serverName: name, offersHTTP2: offersHTTP2, generation: policyGeneration, on: loop)
            {
                // Held like a fresh connection's until the pipelines are built; nothing was
                // asked yet, so anything it says makes the set-up fail.
                let loopSelf = NIOLoopBound(self, eventLoop: loop)
                guard adopt(entry, with: UpstreamHoldHandler(onFirstBytes: { loopSelf.value.reusedUpstreamSpoke = true })) else {
                    return connectUpstream(firstFlight: firstFlight)
                }
                upstream = entry.channel
                verifiedName = entry.serverName
                upstreamProtocol = entry.applicationProtocol
                reusedUpstream = true
                return loop.makeSucceededVoidFuture()
            }
        }
        return connectUpstream(firstFlight: firstFlight)
    }

    /// Takes a connection out of the pool's hands: `handler` replaces its `PooledIdleHandler`
    /// (looked up first, so a failure leaves the pipeline as it was). False (the connection
    /// closed) when the pipeline is not what the pool left.
    private func adopt(_ entry: UpstreamPool.Entry, with handler: any ChannelHandler) -> Bool {
        let pipeline = entry.channel.pipeline.syncOperations
        do {
            let idle = try pipeline.handler(type: PooledIdleHandler.self)
            try pipeline.addHandler(handler)
            pipeline.removeHandler(idle, promise: nil)
        } catch {
            entry.channel.close(promise: nil)
            return false
        }
        upstreamOfferedHTTP2 = entry.offeredHTTP2
        shared.metrics.upstreamReused.increment()
        return true
    }

    /// Builds the rest of both pipelines for `kind` (the upstream is connected).
    func setUp(kind: FirstFlightStateMachine.Kind, context: ChannelHandlerContext) -> EventLoopFuture<Void> {
        let loop = guest.eventLoop
        guard let upstream, !finished else { return loop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
        let handlerContext = NIOLoopBound(context, eventLoop: loop)
        switch kind {
        case .tls(let name, let offersHTTP2):
            serverName = name.map { HostName.normalize($0) }
            guestOffersHTTP2 = offersHTTP2
            if let tunnelHost, serverName != tunnelHost {
                record(
                    .warn, "tunnel-sni-mismatch", reason: "the TLS server name is not the CONNECT host", action: "reset",
                    detail: "CONNECT \(tunnelHost), SNI \(serverName ?? "none")")
                return loop.makeFailedFuture(ChannelError.ioOnClosedChannel)
            }
            if let name = serverName, policy.network.tlsBypass.allows(name) {
                shared.metrics.connectionsBypass.increment()
                return finishSetup(relayOnly: true, guestTLS: nil, context: context)
            }
            shared.metrics.connectionsTLS.increment()
            let name = serverName ?? destinationIP?.description ?? "unknown"
            // A pooled connection was verified for this very name when it was made.
            let verified = reusedUpstream ? loop.makeSucceededVoidFuture() : startUpstreamTLS(on: upstream)
            return verified.assumeIsolated()
                .flatMap { () -> EventLoopFuture<NIOSSLContext> in
                    let cached = self.shared.tls.hasCachedContext(for: name)
                    if cached { self.shared.metrics.leafCacheHits.increment() } else { self.shared.metrics.leafCacheMisses.increment() }
                    let tls = self.shared.tls
                    // The guest is offered h2 only when the upstream chose it.
                    let http2 = self.upstreamProtocol == "h2"
                    // Forging signs a certificate: keep it off the event loop.
                    return self.shared.threadPool.runIfActive(eventLoop: loop) { try tls.serverContext(for: name, http2: http2) }
                }
                .flatMap { serverContext in
                    self.finishSetup(relayOnly: false, guestTLS: serverContext, context: handlerContext.value)
                }.nonisolated()
        case .http:
            shared.metrics.connectionsHTTP.increment()
            return finishSetup(relayOnly: false, guestTLS: nil, context: context)
        case .opaque:
            shared.metrics.connectionsOpaque.increment()
            return finishSetup(relayOnly: false, guestTLS: nil, context: context, opaque: true)
        }
    }

    /// Completes a verified TLS handshake with SNI = the guest's server name, then checks
    /// that the certificate names it as a DNS name.
    private func startUpstreamTLS(on upstream: any Channel, offerHTTP2: Bool? = nil) -> EventLoopFuture<Void> {
        // Only a valid host name is a name: anything else is sent as no SNI, and the flow
        // has no verified name (no secret can flow on it).
        let hostname = serverName.flatMap { HostName.problem(with: $0) == nil ? $0 : nil }
        let handshake = upstream.eventLoop.makePromise(of: String?.self)
        let client: NIOSSLClientHandler
        do {
            // h2 is offered upstream only for a guest that offers it.
            upstreamOfferedHTTP2 = offerHTTP2 ?? guestOffersHTTP2
            let context = upstreamOfferedHTTP2 ? shared.tls.upstreamContextHTTP2 : shared.tls.upstreamContext
            client = try NIOSSLClientHandler(context: context, serverHostname: hostname)
            let pipeline = upstream.pipeline.syncOperations
            try pipeline.addHandler(client, position: .first)
            try pipeline.addHandler(HandshakeWatcher(promise: handshake), position: .after(client))
        } catch {
            return upstream.eventLoop.makeFailedFuture(error)
        }
        return handshake.futureResult.assumeIsolated().flatMapThrowing { (chosen: String?) -> Void in
            self.upstreamProtocol = chosen
            // The chain verified (NIOSSL, against the trust roots). The name is ours to
            // check: a dNSName SAN matching the SNI, never an iPAddress SAN.
            guard let hostname else { return }
            let problem: String
            if let der = try? client.peerCertificate?.toDERBytes() {
                guard let found = self.shared.tls.upstreamNames.problem(certificateDER: der, name: hostname) else {
                    self.verifiedName = hostname
                    return
                }
                problem = found
            } else {
                problem = "the upstream presented no certificate"
            }
            throw UpstreamNameNotVerified(reason: problem)
        }.flatMapErrorThrowing { error in
            self.shared.metrics.upstreamVerifyFailures.increment()
            if let unverified = error as? UpstreamNameNotVerified {
                self.record(.warn, "upstream-tls-failed", reason: "name-not-verified", detail: unverified.reason)
            } else {
                self.record(.warn, "upstream-tls-failed", reason: "upstream certificate or handshake rejected", detail: "\(error)")
            }
            throw error
        }.nonisolated()
    }

    private func finishSetup(
        relayOnly: Bool, guestTLS: NIOSSLContext?, context: ChannelHandlerContext, opaque: Bool = false
    ) -> EventLoopFuture<Void> {
        guard let upstream, guest.isActive, !finished else { return guest.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
        if reusedUpstreamSpoke {
            record(.warn, "upstream-error", reason: "a pooled upstream connection sent bytes nobody asked for", action: "reset")
            return guest.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel)
        }
        do {
            let guestPipeline = guest.pipeline.syncOperations
            let upstreamPipeline = upstream.pipeline.syncOperations
            if !relayOnly {
                var guestTLSHandler: NIOSSLServerHandler?
                if let guestTLS {
                    let handler = NIOSSLServerHandler(context: guestTLS)
                    try guestPipeline.addHandler(handler, position: .after(context.handler))
                    guestTLSHandler = handler
                }
                let identity = makeIdentity(tls: guestTLS != nil)
                // Responses are masked where a value may go upstream: a secret is allowed
                // for the name this connection goes to (and on any connection, once a
                // substitution happened on it).
                let names = identity.sni.map { [$0] } ?? Array(identity.dnsPinnedNames)
                let masking = !opaque && policy.secrets.contains { secret in names.contains { secret.allowedHosts.allows($0) } }
                if let guestTLSHandler, upstreamProtocol == "h2" {
                    // Both legs speak HTTP/2: streams, each through the engine.
                    shared.metrics.connectionsHTTP2.increment()
                    let relay = HTTP2Relay(session: self, identity: identity, masking: masking)
                    if let watcher = try? upstreamPipeline.handler(type: HandshakeWatcher.self) {
                        upstreamPipeline.removeHandler(watcher, promise: nil)
                    }
                    try relay.install(guestTLS: guestTLSHandler, upstream: upstream)
                    http2 = relay
                    // The same idle timer as HTTP/1: both legs' reads move it on
                    // (`HTTP2ConnectionHandler.channelReadComplete`).
                    startIdleTimer()
                    try upstreamPipeline.handler(type: UpstreamHoldHandler.self).release()
                    return guest.eventLoop.makeSucceededVoidFuture()
                }
                var configuration = RewriterConfiguration()
                configuration.identityResponses = masking
                // A verified HTTP/1.1 upstream may go back to the pool when the guest is done.
                configuration.keepUpstreamAlive = mayPoolUpstream
                rewriter = RequestRewriter(
                    identity: identity, secrets: secrets, configuration: configuration, mode: opaque ? .opaque : .http,
                    heldBodyBudget: shared.heldBodies)
                if !opaque { masker = ResponseMasker(secrets: secrets, masking: masking) }
            }
            try guestPipeline.addHandler(GuestSideHandler(session: self), position: .last)
            if let watcher = try? upstreamPipeline.handler(type: HandshakeWatcher.self) {
                upstreamPipeline.removeHandler(watcher, promise: nil)
            }
            try upstreamPipeline.addHandler(UpstreamSideHandler(session: self))
            startIdleTimer()
            // What the upstream sent meanwhile (a banner) goes on to the guest now.
            let hold = try upstreamPipeline.handler(type: UpstreamHoldHandler.self)
            hold.release()
        } catch {
            return guest.eventLoop.makeFailedFuture(error)
        }
        return guest.eventLoop.makeSucceededVoidFuture()
    }

    /// Whether this session's upstream may be pooled when the guest is done with it: a
    /// TLS connection whose certificate was verified for the guest's server name, speaking
    /// HTTP/1.1, not inside a CONNECT tunnel.
    var mayPoolUpstream: Bool {
        guard shared.upstreamPool.isEnabled, tunnelHost == nil, http2 == nil, upstreamProtocol != "h2" else { return false }
        guard let serverName, verifiedName == serverName else { return false }
        return true
    }

    /// The guest is done at a clean boundary (every request went upstream whole, every
    /// response came back whole, the upstream keeps the connection open, nothing was
    /// blocked): the upstream connection goes to the pool instead of closing. Returns
    /// whether it did; the session no longer owns the connection then.
    private func poolUpstream() -> Bool {
        guard atCleanBoundary, let upstream, upstream.isActive, policyGeneration == shared.policyGeneration, let serverName
        else { return false }
        // Idle since its last use: one idle for longer than the pool keeps connections may be
        // one the upstream is closing (its keep-alive timeout), so it is not lent.
        let since = lastUpstreamUse
        guard since + shared.upstreamPool.idleTimeout > .now() else { return false }
        let pipeline = upstream.pipeline.syncOperations
        do {
            let side = try pipeline.handler(type: UpstreamSideHandler.self)
            try pipeline.addHandler(PooledIdleHandler(pool: shared.upstreamPool, deadline: since + shared.upstreamPool.idleTimeout))
            pipeline.removeHandler(side, promise: nil)
        } catch {
            return false
        }
        self.upstream = nil
        // Read while idle (reading may have stopped for a slow guest): a byte or a close from
        // the upstream then takes the connection out of the pool at once.
        upstream.setOption(.autoRead, value: true).whenFailure { _ in }
        upstream.read()
        let evicted = shared.upstreamPool.put(
            UpstreamPool.Entry(
                channel: upstream, serverName: serverName, offeredHTTP2: upstreamOfferedHTTP2, applicationProtocol: upstreamProtocol,
                since: since, generation: policyGeneration),
            to: destination)
        for channel in evicted { channel.close(promise: nil) }
        shared.metrics.upstreamPooled.increment()
        return true
    }

    /// Every request went upstream whole, every response came back whole, the upstream
    /// keeps the connection open, nothing was blocked: the upstream connection could carry
    /// other requests (this session's later ones, or another guest connection's).
    private var atCleanBoundary: Bool {
        guard mayPoolUpstream, blockAnswer == nil, let rewriter, rewriter.status == .open, rewriter.betweenRequests, rewriter.identity.isTLS,
            let masker, masker.upstreamReusable, masker.betweenResponses, masker.outstandingResponses == 0
        else { return false }
        return true
    }

    /// A quiet guest connection lets its upstream go: to the pool if it is young enough to
    /// be lent, else closed (without closing the guest). Returns whether it let go.
    private func detachIfIdle() -> Bool {
        guard atCleanBoundary, let upstream else { return false }
        if poolUpstream() { return true }
        let pipeline = upstream.pipeline.syncOperations
        if let side = try? pipeline.handler(type: UpstreamSideHandler.self) { pipeline.removeHandler(side, promise: nil) }
        upstream.close(promise: nil)
        self.upstream = nil
        return true
    }

    private func makeIdentity(tls: Bool) -> ConnectionIdentity {
        guard let destinationIP else { return ConnectionIdentity(sni: nil, dnsPinnedNames: [], upstreamVerified: false) }
        if tls {
            let name = serverName ?? destinationIP.description
            let pinned = serverName.map { shared.dns.isPinned(name: $0, address: destinationIP) } ?? false
            // Verified means: this very name was checked against the upstream's certificate.
            return ConnectionIdentity(
                sni: name, dnsPinnedNames: pinned ? [name] : [], upstreamVerified: verifiedName != nil && verifiedName == serverName)
        }
        return ConnectionIdentity(sni: nil, dnsPinnedNames: Set(shared.dns.names(for: destinationIP)), upstreamVerified: false)
    }

    // MARK: Data

    func fromGuest(_ buffer: ByteBuffer) {
        guard !finished else { return }
        lastActivity = .now()
        guard let rewriter else {
            guard let upstream else { return }
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
        let now = NIODeadline.now()
        lastActivity = now
        guard let masker else {
            // Opaque flows and TLS bypass: relayed as they are.
            shared.metrics.bytesDownstream.increment(by: Int64(buffer.readableBytes))
            guest.writeAndFlush(buffer, promise: nil)
            return
        }
        masker.consume(buffer, into: &maskOutput)
        deliverToGuest()
        lastUpstreamUse = now
        if detachTimer == nil, !finished { armDetachTimer() }
    }

    // MARK: Idle connections

    /// Bytes arrived from either side: the idle timeout counts from now.
    func noteActivity() {
        lastActivity = .now()
    }

    /// The idle timeout, counted from the end of the set-up.
    private func startIdleTimer() {
        noteActivity()
        armIdleTimer()
    }

    /// A connection on which neither side sent anything for `idleTimeout` is reset. One
    /// timer per session, re-armed only when it fires early (a busy connection pays a clock
    /// read per read, not a timer, a promise and a callback per write as NIO's
    /// `IdleStateHandler` does).
    private func armIdleTimer() {
        let timeout = shared.configuration.idleTimeout
        guard timeout > .zero, !finished else { return }
        let loopSelf = NIOLoopBound(self, eventLoop: guest.eventLoop)
        idleTimer = guest.eventLoop.scheduleTask(deadline: lastActivity + timeout) {
            let session = loopSelf.value
            session.idleTimer = nil
            guard !session.finished else { return }
            if NIODeadline.now() < session.lastActivity + timeout {
                session.armIdleTimer()
            } else {
                session.abort()
            }
        }
    }

    // MARK: Idle upstream

    /// A guest that keeps its connection open but goes quiet does not keep an upstream
    /// connection: after `upstreamDetachAfter` without upstream traffic, at a clean boundary,
    /// the upstream goes to the pool (where another guest connection may take it, or it
    /// closes after the pool's idle timeout). One timer per session, re-armed only when it
    /// fires early, so a busy connection pays a clock read per response, not a timer.
    private func armDetachTimer() {
        let after = shared.configuration.upstreamDetachAfter
        guard after > .zero, rewriter != nil, !detached, mayPoolUpstream else { return }
        let loopSelf = NIOLoopBound(self, eventLoop: guest.eventLoop)
        detachTimer = guest.eventLoop.scheduleTask(deadline: lastUpstreamUse + after) {
            let session = loopSelf.value
            session.detachTimer = nil
            guard !session.finished, !session.detached, session.upstream != nil else { return }
            if NIODeadline.now() < session.lastUpstreamUse + after {
                session.armDetachTimer()
            } else if session.detachIfIdle() {
                session.detached = true
                session.releaseIdleCapacity()
            }
        }
    }

    /// A quiet connection holds as little as it can: what it kept for the next request
    /// (joined partial reads, the last audit line, the engine's and the outputs' scratch
    /// capacity) goes, and is made again when the guest speaks.
    private func releaseIdleCapacity() {
        upstreamJoin = nil
        guestJoin = nil
        substitutionLine = nil
        rewriter?.releaseIdleCapacity()
        masker?.releaseIdleCapacity()
        output.releaseDrainedCapacity()
        maskOutput.releaseDrainedCapacity()
    }

    /// The detached session's guest sent a request: an idle pooled connection verified for
    /// this name, or a new one, handshaken and verified like the first (nothing of the
    /// request goes out before). Meanwhile the guest is not read and what the engine
    /// produced is held in order.
    private func reattach() {
        guard !reattaching, !finished, let serverName else { return }
        reattaching = true
        updateGuestReading()
        let loop = guest.eventLoop
        if let entry = shared.upstreamPool.take(to: destination, serverName: serverName, offersHTTP2: nil, generation: policyGeneration, on: loop),
            adopt(entry, with: UpstreamSideHandler(session: self))
        {
            return reattached(entry.channel)
        }
        // A new connection is held to what a new guest connection would be: egress now, and
        // the name's DNS pin still within its TTL (the held bytes may carry real values that
        // were substituted because of that pin).
        if case .denied(let rule) = shared.egressDecision(for: destination) {
            shared.metrics.egressDenied.increment()
            record(.warn, "egress-denied", reason: rule, action: "reset", detail: "reconnecting an idle connection's upstream: its held requests were not sent")
            return abort()
        }
        if let rewriter, rewriter.identity.dnsPinnedNames.contains(serverName), let destinationIP,
            !shared.dns.isPinned(name: serverName, address: destinationIP)
        {
            record(
                .warn, "upstream-reattach-failed", reason: "dns-pin-expired", action: "reset",
                detail: "the DNS answer that pinned the name to this address has expired: the held requests were not sent")
            return abort()
        }
        // Verified anew: set again only by a handshake whose certificate names serverName.
        verifiedName = nil
        let loopSelf = NIOLoopBound(self, eventLoop: loop)
        reattachDeadline = loop.scheduleTask(in: shared.configuration.connectTimeout) {
            let session = loopSelf.value
            guard session.reattaching, !session.finished else { return }
            session.record(
                .warn, "upstream-setup-timeout", reason: "the upstream did not complete its handshake in time", action: "reset",
                detail: "reconnecting an idle connection's upstream: its held requests were not sent")
            session.abort()
        }
        upstreamBootstrap().connect(to: destination).assumeIsolated().flatMapError { error -> EventLoopFuture<any Channel> in
            self.shared.metrics.upstreamConnectFailures.increment()
            self.record(.warn, "upstream-connect-failed", detail: "\(error)")
            return loop.makeFailedFuture(error)
        }.flatMap { channel -> EventLoopFuture<any Channel> in
            guard !self.finished else {
                channel.close(promise: nil)
                return loop.makeFailedFuture(ChannelError.ioOnClosedChannel)
            }
            self.pendingUpstream = channel
            // The guest's side already speaks HTTP/1.1: the upstream is offered only that.
            return self.startUpstreamTLS(on: channel, offerHTTP2: false).map { channel }.flatMapErrorThrowing { error in
                channel.close(promise: nil)
                throw error
            }
        }.whenComplete { result in
            self.pendingUpstream = nil
            switch result {
            case .success(let channel):
                guard !self.finished, self.verifiedName == serverName else {
                    channel.close(promise: nil)
                    return self.abort()
                }
                let pipeline = channel.pipeline.syncOperations
                if let watcher = try? pipeline.handler(type: HandshakeWatcher.self) { pipeline.removeHandler(watcher, promise: nil) }
                do {
                    try pipeline.addHandler(UpstreamSideHandler(session: self))
                } catch {
                    channel.close(promise: nil)
                    return self.abort()
                }
                self.reattached(channel)
            case .failure:
                if !self.finished {
                    self.record(.warn, "upstream-reattach-failed", action: "reset", detail: "no verified upstream connection: the held requests were not sent")
                }
                self.abort()
            }
        }
    }

    private func reattached(_ channel: any Channel) {
        upstream = channel
        detached = false
        reattaching = false
        reattachDeadline?.cancel()
        reattachDeadline = nil
        lastUpstreamUse = .now()
        // Read the upstream only while the guest takes what it sends (the guest may have
        // stopped reading before the upstream was let go).
        channel.setOption(.autoRead, value: guest.isWritable).whenFailure { _ in }
        if !output.upstream.isEmpty { writeOutput(to: channel) }
        updateGuestReading()
    }

    /// Writes what the masker decided to the guest and acts on its events: an upgrade
    /// decided from the request/response pair, a masking (audited), or a response that
    /// cannot be read (reset).
    private func deliverToGuest() {
        if maskOutput.scannedBytes > 0 {
            shared.metrics.responseBytesScanned.increment(by: Int64(maskOutput.scannedBytes))
            maskOutput.scannedBytes = 0
        }
        // The guest asked to close after this response (the masker reads nothing after it).
        let closeDue = masker?.guestCloseDue == true
        var written: EventLoopFuture<Void>?
        if !maskOutput.guest.isEmpty {
            let promise = closeDue ? guest.eventLoop.makePromise(of: Void.self) : nil
            let total = Self.writeCoalesced(maskOutput.guest, to: guest, promise: promise, reusing: &guestJoin)
            shared.metrics.bytesDownstream.increment(by: Int64(total))
            maskOutput.guest.removeAll(keepingCapacity: true)
            written = promise?.futureResult
        }
        defer {
            if closeDue { closeAfterResponse(written ?? guest.eventLoop.makeSucceededVoidFuture()) }
        }
        guard !maskOutput.events.isEmpty else { return }
        // Taken out (a handler may add more) and given back for its capacity afterwards.
        var events: [MaskEvent] = []
        swap(&events, &maskOutput.events)
        defer {
            if maskOutput.events.isEmpty {
                events.removeAll(keepingCapacity: true)
                swap(&events, &maskOutput.events)
            }
        }
        for event in events {
            switch event {
            case .masked(let secret, let site, let form):
                shared.metrics.masked(secret: secret, site: site.rawValue, form: form.rawValue)
                shared.audit.write(
                    AuditRecord(
                        level: .info, event: "masked", sandbox: policy.name, connection: id, secret: secret, site: site.rawValue,
                        form: form.rawValue, sni: serverName, destination: destinationText))
            case .upgrade(let outcome):
                guard let rewriter, rewriter.status == .awaitingUpgradeDecision else { continue }
                if case .accepted(let chosen) = outcome {
                    rewriter.upgradeAccepted(websocket: chosen == "websocket", into: &output)
                } else {
                    rewriter.upgradeDeclined(into: &output)
                }
                deliver(rewriter)
                updateGuestReading()
            case .framingError(let error, let detail):
                shared.metrics.responseFramingErrors.increment()
                shared.audit.write(
                    AuditRecord(
                        level: .warn, event: error == .valueInResponse ? "value-in-response" : "response-framing-error", sandbox: policy.name,
                        connection: id, reason: error.rawValue, action: "reset", sni: serverName, destination: destinationText,
                        detail: "\(error.explanation) (\(detail))"))
                abort()
                return
            }
        }
    }

    /// The guest asked to close after the response it just got (its `Connection: close`
    /// was kept from the upstream): once the response is written, the guest's connection
    /// closes and the upstream's goes to the pool (or closes).
    private func closeAfterResponse(_ written: EventLoopFuture<Void>) {
        guard !finished else { return }
        finished = true
        stopPendingWork()
        if !poolUpstream() { upstream?.close(promise: nil) }
        written.assumeIsolated().whenComplete { [guest] _ in guest.close(promise: nil) }
    }

    /// Pieces smaller than a TLS record are joined before they are written: NIOSSL makes a
    /// record of every write, and an edited head (slices around a replacement value) would
    /// otherwise cost a record per slice on both ends. Large pieces (streamed bodies) go on
    /// as they are. Returns the bytes written; flushes.
    static let coalesceLimit = 16 * 1024

    /// Kept for the next join when it is at most this large (an idle connection holds little).
    static let joinKeepLimit = 4 * 1024

    static func writeCoalesced(
        _ pieces: [ByteBuffer], to channel: any Channel, promise: EventLoopPromise<Void>? = nil, reusing scratch: inout ByteBuffer?
    ) -> Int {
        var total = 0
        guard pieces.count > 1 else {
            for piece in pieces {
                total += piece.readableBytes
                channel.write(piece, promise: promise)
            }
            channel.flush()
            return total
        }
        // `promise` completes with the last write.
        var last: ByteBuffer?
        func write(_ buffer: ByteBuffer) {
            if let previous = last { channel.write(previous, promise: nil) }
            last = buffer
        }
        let capacity = min(coalesceLimit, pieces.reduce(0) { $0 + $1.readableBytes })
        var pending: ByteBuffer?
        for piece in pieces {
            total += piece.readableBytes
            if piece.readableBytes >= coalesceLimit {
                if let joined = pending {
                    write(joined)
                    pending = nil
                }
                write(piece)
                continue
            }
            if let joined = pending, joined.readableBytes + piece.readableBytes > coalesceLimit {
                write(joined)
                pending = nil
            }
            if pending == nil {
                // The last join, written and flushed before: TLS has copied it into a record
                // by now, so it is ours alone again and is refilled in place (were it still
                // held, by a socket that could not take it all, writing copies it first).
                if var reused = scratch.take() {
                    reused.clear()
                    pending = reused
                } else {
                    pending = channel.allocator.buffer(capacity: capacity)
                }
            }
            pending!.writeImmutableBuffer(piece)
        }
        if let joined = pending {
            if joined.capacity <= joinKeepLimit { scratch = joined }
            write(joined)
        }
        if let last { channel.write(last, promise: promise) }
        channel.flush()
        return total
    }

    /// The guest is read while the upstream can take more and no upgrade is being decided
    /// (what the guest sends after an upgrade request is held, so it is not read: a flood
    /// toward a silent server stays within a read or two).
    func updateGuestReading() {
        guard !finished else { return }
        let upstreamWritable = upstream?.isWritable ?? !reattaching
        let deciding = rewriter?.status == .awaitingUpgradeDecision
        guest.setOption(.autoRead, value: upstreamWritable && !deciding).whenFailure { _ in }
    }

    /// What the engine produced for the upstream, written (joined into records) and counted.
    private func writeOutput(to upstream: any Channel) {
        let total = Self.writeCoalesced(output.upstream, to: upstream, reusing: &upstreamJoin)
        shared.metrics.bytesUpstream.increment(by: Int64(total))
        output.upstream.removeAll(keepingCapacity: true)
        lastUpstreamUse = .now()
    }

    private func deliver(_ rewriter: RequestRewriter) {
        guard upstream != nil || detached else { return }
        if !output.expectedResponses.isEmpty {
            for expected in output.expectedResponses { masker?.expect(expected) }
            output.expectedResponses.removeAll(keepingCapacity: true)
        }
        if output.requests > requestsCounted {
            shared.metrics.requests.increment(by: Int64(output.requests - requestsCounted))
            requestsCounted = output.requests
        }
        if !output.upstream.isEmpty {
            if let upstream {
                writeOutput(to: upstream)
            } else {
                // Detached: held (in order) until an upstream connection is back.
                reattach()
            }
        }
        if output.continueToGuest {
            output.continueToGuest = false
            guest.writeAndFlush(ByteBuffer(string: "HTTP/1.1 100 Continue\r\n\r\n"), promise: nil)
        }
        if !output.events.isEmpty {
            // Taken out (handling one may add more) and given back for its capacity.
            var events: [RewriteEvent] = []
            swap(&events, &output.events)
            for event in events { handle(event) }
            if output.events.isEmpty {
                events.removeAll(keepingCapacity: true)
                swap(&events, &output.events)
            }
        }
        switch rewriter.status {
        case .blocked: abort()
        case .awaitingUpgradeDecision: updateGuestReading()
        case .open: break
        }
    }

    /// A `substituted` audit record. The same secret, site and request target as the last
    /// one write the bytes kept from it (no record, no strings) unless someone observes
    /// records.
    private func auditSubstitution(secret: String, site: Site, request: RequestSummary) {
        let audit = shared.audit
        guard audit.takesPreformatted else { return audit.write(substitutionRecord(secret: secret, site: site, request: request)) }
        if let line = substitutionLine, line.secret == secret, line.site == site, line.sni == serverName, request.hasTarget(line.target) {
            return audit.write(info: line.fields)
        }
        var fields: [UInt8] = []
        substitutionRecord(secret: secret, site: site, request: request).appendFieldsAfterTime(to: &fields)
        substitutionLine = fields.count <= Self.substitutionLineLimit ? (secret, site, serverName, request.targetBytes, fields) : nil
        audit.write(info: fields)
    }

    private func substitutionRecord(secret: String, site: Site, request: RequestSummary) -> AuditRecord {
        AuditRecord(
            level: .info, event: "substituted", sandbox: policy.name, connection: id, secret: secret, site: site.rawValue,
            sni: serverName, host: request.host, destination: destinationText, method: request.method, path: request.path)
    }

    func handle(_ event: RewriteEvent) {
        switch event {
        case .substituted(let secret, let site, let request):
            masker?.activate()
            if let cached = substitutionCounter, cached.secret == secret, cached.site == site {
                cached.counter.increment()
            } else {
                let counter = shared.metrics.substitutionCounter(secret: secret, site: site.rawValue)
                counter.increment()
                substitutionCounter = (secret, site, counter)
            }
            auditSubstitution(secret: secret, site: site, request: request)
        case .passedThrough(let secret, let site, let request):
            shared.metrics.passedThrough.increment()
            shared.audit.write(
                AuditRecord(
                    level: .info, event: "passed-through", sandbox: policy.name, connection: id, secret: secret, site: site.rawValue,
                    sni: serverName, host: request.host, destination: destinationText, method: request.method, path: request.path,
                    detail: "the placeholder went on unchanged to one of the secret's passthrough hosts"))
        case .violation(let violation):
            // The stricter of the secret's own action and the network's.
            let own = policy.secrets.first { $0.env == violation.secret }?.onViolation
            let action = policy.network.onSecretViolation.stricter(own)
            switch action {
            case .block: shared.metrics.violationsBlock.increment()
            case .blockAndLog: shared.metrics.violationsLog.increment()
            case .blockAndTerminate: shared.metrics.violationsTerminate.increment()
            }
            let answered = prepareBlockAnswer(
                secret: violation.secret, host: violation.request?.host, reason: violation.reason.rawValue, site: violation.site,
                action: action.rawValue)
            if action != .block {
                shared.audit.write(
                    AuditRecord(
                        level: action == .blockAndLog ? .warn : .error, event: "violation", sandbox: policy.name, connection: id,
                        secret: violation.secret, site: violation.site.rawValue, form: violation.form.rawValue,
                        reason: violation.reason.rawValue, action: action.rawValue, sni: serverName, host: violation.request?.host,
                        destination: destinationText, method: violation.request?.method, path: violation.request?.path,
                        response: answered ? "http-403" : "reset"))
            }
            if action == .blockAndTerminate {
                shared.onTerminate("secret \(violation.secret) was sent to \(violation.request?.host ?? serverName ?? destinationText) (\(violation.reason.rawValue))")
            }
        case .hostMismatch(let request):
            shared.metrics.hostMismatches.increment()
            let reason = rewriter?.identity.isTLS == true ? "host-not-sni" : "authority-not-host"
            let answered = prepareBlockAnswer(secret: nil, host: request?.host, reason: reason, site: nil, action: "block")
            shared.audit.write(
                AuditRecord(
                    level: .warn, event: "host-mismatch", sandbox: policy.name, connection: id,
                    reason: reason, action: "reset",
                    sni: serverName, host: request?.host, destination: destinationText, method: request?.method, path: request?.path,
                    detail: "the Host header (or the target's authority) names another host than the TLS server name: domain fronting is refused",
                    response: answered ? "http-403" : "reset"))
        case .framingError(let error, let request):
            shared.metrics.framingErrors.increment()
            shared.audit.write(
                AuditRecord(
                    level: .warn, event: "framing-error", sandbox: policy.name, connection: id, reason: error.rawValue,
                    action: "reset", sni: serverName, host: request?.host, destination: destinationText, method: request?.method,
                    path: request?.path, detail: error.explanation))
        }
    }

    /// An error on the guest's connection. The guest's TLS client refused the forged
    /// certificate: an explicit alert names it (unknown CA, bad certificate); more often the
    /// TLS 1.3 client's alert arrives as a record BoringSSL cannot read (BAD_PACKET_LENGTH),
    /// or the client just hangs up mid-handshake. Say what it most likely is, and how to fix
    /// it. A close without close_notify is common and harmless: just close.
    func guestFailed(_ error: any Error, handshakeDone: Bool) {
        let text = "\(error)"
        let intercepted = rewriter?.identity.isTLS ?? (http2 != nil)
        let duringHandshake = serverName != nil && !handshakeDone && intercepted
        let alert = ["UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE"].contains(where: text.contains)
        var aborted = text.contains("BAD_PACKET_LENGTH")
        if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl { aborted = true }
        if alert || (duringHandshake && aborted) {
            record(
                .warn, "guest-does-not-trust-ca", reason: alert ? "tls-alert" : "handshake-aborted",
                detail: (alert
                    ? "the guest's TLS client rejected Keyhole's certificate"
                    : "the guest's TLS client gave up during the handshake, after Keyhole's certificate (most often: it does not trust the sandbox CA)")
                    + " (\(text)): install the sandbox CA in the guest; `keyhole ca install-script` prints a script that does it for the system store and for runtimes with their own bundles (Python requests/httpx, Node, gRPC, Java)")
            abort()
            return
        }
        if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl {
            guestClosed()
            return
        }
        record(.warn, "guest-error", detail: text)
        abort()
    }

    /// The session ends: its timers stop, and a reattach's connection still being verified
    /// is closed.
    private func stopPendingWork() {
        headDeadline?.cancel()
        detachTimer?.cancel()
        idleTimer?.cancel()
        reattachDeadline?.cancel()
        pendingUpstream?.close(promise: nil)
    }

    /// A violation or broken framing: reset the guest (or, with `block_response: http`,
    /// answer the blocked request and close), drop the upstream.
    func abort() {
        guard !finished else { return }
        finished = true
        http2 = nil
        stopPendingWork()
        upstream?.close(promise: nil)
        if let answer = blockAnswer {
            blockAnswer = nil
            guest.writeAndFlush(answer).assumeIsolated().whenComplete { [guest] _ in guest.close(promise: nil) }
            return
        }
        guest.reset()
    }

    /// With `block_response: http`, prepares the `403` for a blocked request when the guest
    /// can read it as the answer to that request: HTTP that Keyhole parses (intercepted TLS
    /// or plain), not a relayed or WebSocket stream, and no earlier response still on its
    /// way (it would arrive out of order). Returns whether it will be sent.
    private func prepareBlockAnswer(secret: String?, host: String?, reason: String, site: Site?, action: String) -> Bool {
        guard policy.network.blockResponse == .http else { return false }
        let streamed: Set<Site> = [.upgraded, .opaque, .websocket]
        if let site, streamed.contains(site) { return false }
        if http2 != nil {
            // On HTTP/2 the blocked stream is answered (if nothing of its response went out).
            blockAnswerHTTP2 = (reason, Self.blockBody(secret: secret, host: host ?? serverName ?? destinationText, reason: reason, site: site, action: action))
            return true
        }
        guard let masker, masker.betweenResponses else { return false }
        // A request blocked in its body was already announced upstream: it may be the one
        // outstanding response (which will never come: the upstream is closed).
        let announced = site == .body || site == .trailer ? 1 : 0
        guard masker.outstandingResponses <= announced else { return false }
        let body = Self.blockBody(secret: secret, host: host ?? serverName ?? destinationText, reason: reason, site: site, action: action)
        var answer = ByteBuffer()
        answer.writeString(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n"
                + "Connection: close\r\nX-Keyhole-Blocked: \(reason)\r\n\r\n")
        answer.writeString(body)
        blockAnswer = answer
        return true
    }

    /// The JSON of a `block_response: http` answer: what was blocked and why (never a value).
    static func blockBody(secret: String?, host: String, reason: String, site: Site?, action: String) -> String {
        var fields: [(String, String)] = [("error", "blocked_by_keyhole")]
        if let secret { fields.append(("secret", secret)) }
        fields.append(("host", host))
        fields.append(("reason", reason))
        if let site { fields.append(("site", site.rawValue)) }
        fields.append(("action", action))
        fields.append((
            "hint",
            secret == nil
                ? "the request named another host than the one the connection goes to (domain fronting is refused)"
                : "Keyhole substitutes a secret's placeholder only for the hosts its policy allows, in the sites it allows; this request was not sent. See the Keyhole README, 'Substitution semantics'."
        ))
        return "{" + fields.map { "\(AuditRecord.quote($0.0)):\(AuditRecord.quote($0.1))" }.joined(separator: ",") + "}\n"
    }

    // MARK: CONNECT

    /// Where a guest's `CONNECT` goes.
    enum TunnelTarget: Equatable {
        case name(String, port: Int)
        case address(IPAddress, port: Int)
    }

    /// Checks the head of a guest's `CONNECT` (to what it takes for a proxy; Keyhole answers
    /// it itself). The engine reads it first: placeholders in its headers follow the usual
    /// rules (the head goes nowhere, so nothing is substituted: one there is a violation,
    /// with its action, whatever else is wrong with the request), and a Host must agree
    /// with the authority. Then the head must be whole, not inside another tunnel, and its
    /// authority `host:port`. Nil when refused (audited, the guest reset).
    func tunnelTarget(head: ByteBuffer, complete: Bool, nested: Bool) -> TunnelTarget? {
        let bytes = Array(head.readableBytesView)
        let lineEnd = bytes.firstIndex(of: 0x0D)
        let requestLine = bytes[..<(lineEnd ?? bytes.count)].split(separator: 0x20, omittingEmptySubsequences: false)
        let authority = requestLine.count == 3 ? String(validating: requestLine[1], as: UTF8.self) : nil
        // A CONNECT without Host (Python's http.client sends none) gets one naming its
        // authority for the engine, so that the request is read as a whole.
        var engineHead = head
        if let lineEnd, lineEnd + 1 < bytes.count, let authority {
            let fields = bytes[(lineEnd + 2)...]
            let hasHost = fields.split(separator: 0x0A).contains { line in
                line.count >= 5 && String(decoding: line.prefix(5), as: UTF8.self).lowercased() == "host:"
            }
            if !hasHost {
                engineHead = ByteBuffer(bytes: bytes[..<(lineEnd + 2)])
                engineHead.writeString("Host: \(authority)\r\n")
                engineHead.writeBytes(fields)
            }
        }
        let check = RequestRewriter(
            identity: ConnectionIdentity(sni: nil, dnsPinnedNames: [], upstreamVerified: false), secrets: secrets,
            configuration: RewriterConfiguration(), mode: .http, heldBodyBudget: shared.heldBodies)
        var checked = RewriteOutput()
        check.consume(engineHead, into: &checked)
        if !complete { check.finish(into: &checked) }
        for event in checked.events { handle(event) }
        if check.status == .blocked {
            abort()
            return nil
        }
        guard complete else { return refuseTunnel("the CONNECT head does not end within \(FirstFlightStateMachine.maxBuffered) bytes") }
        guard !nested else {
            record(.warn, "tunnel-refused", reason: "a CONNECT inside a CONNECT tunnel", action: "reset")
            abort()
            return nil
        }
        guard let authority, let target = Self.tunnelTarget(authority) else { return refuseTunnel("the CONNECT target is not host:port") }
        return target
    }

    /// `host:port` (a DNS name, an IPv4 address or a bracketed IPv6 one; a port 1–65535).
    static func tunnelTarget(_ authority: String) -> TunnelTarget? {
        guard let colon = authority.lastIndex(of: ":"), let port = Int(authority[authority.index(after: colon)...]), (1...65535).contains(port)
        else { return nil }
        var host = String(authority[..<colon])
        if host.hasPrefix("[") {
            guard host.hasSuffix("]"), let address = IPAddress(String(host.dropFirst().dropLast())), !address.isIPv4 else { return nil }
            return .address(address, port: port)
        }
        if let address = IPAddress(host), address.isIPv4 { return .address(address, port: port) }
        host = HostName.normalize(host)
        guard HostName.problem(with: host) == nil else { return nil }
        return .name(host, port: port)
    }

    private func refuseTunnel(_ reason: String) -> TunnelTarget? {
        shared.metrics.framingErrors.increment()
        record(.warn, "framing-error", reason: "bad-connect", action: "reset", detail: reason)
        abort()
        return nil
    }

    /// This session's flow became a `CONNECT` tunnel, which another session carries: its
    /// connection to the original destination (made, or still being made) is dropped, and
    /// the guest is left alone.
    func discardUpstream() {
        finished = true
        stopPendingWork()
        upstream?.close(promise: nil)
        upstream = nil
    }

    func guestClosed() {
        // Whatever ended the session, its timers do not outlive the guest's connection.
        guard !finished else { return stopPendingWork() }
        // Only a guest that left between requests leaves a connection worth pooling.
        let betweenRequests = rewriter?.betweenRequests ?? false
        if let rewriter {
            rewriter.finish(into: &output)
            deliver(rewriter)
            if finished { return }
        }
        finished = true
        stopPendingWork()
        if !(betweenRequests && poolUpstream()) { upstream?.close(promise: nil) }
    }

    func upstreamClosed() {
        guard !finished else { return }
        if let masker {
            // A close-delimited body ends here; what the masker held back is decided now.
            masker.finish(into: &maskOutput)
            deliverToGuest()
            if finished { return }
        }
        finished = true
        stopPendingWork()
        guest.close(promise: nil)
    }
}

@available(*, unavailable)
extension Session: Sendable {}

/// The upstream's chain verified, but its certificate does not name the SNI as a DNS name.
struct UpstreamNameNotVerified: Error, CustomStringConvertible {
    let reason: String
    var description: String { reason }
}
