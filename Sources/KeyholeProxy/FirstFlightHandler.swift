import KeyholePolicy
import NIOCore

/// Drives `FirstFlightStateMachine` for one guest connection: reads the original
/// destination, checks egress, has the `Session` connect upstream at once, buffers the
/// guest's first bytes, and hands the connection over once the pipelines are built,
/// replaying every byte it read (then it removes itself).
///
/// A first request `CONNECT host:port` is answered here: the head is checked, the host
/// resolved through a trusted resolver (and pinned), egress checked, `200` sent, and the
/// tunnel's first bytes classified as a fresh flow to that address by a new machine and a
/// new `Session` (one level deep: a CONNECT inside the tunnel is refused).
final class FirstFlightHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    let shared: ProxyShared
    private var machine = FirstFlightStateMachine()
    private var session: Session?
    private var timeout: Scheduled<Void>?
    private var context: ChannelHandlerContext?
    /// Inside a CONNECT tunnel Keyhole answered.
    private var inTunnel = false

    init(shared: ProxyShared) {
        self.shared = shared
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timeout?.cancel()
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        let channel = context.channel
        OriginalDestination.of(channel).assumeIsolated().whenComplete { result in
            switch result {
            case .success(let address):
                self.destinationKnown(address, channel: channel)
            case .failure:
                self.shared.audit.write(
                    AuditRecord(
                        level: .warn, event: "no-original-destination", sandbox: self.shared.policy.name, connection: 0,
                        detail: "the flow was not redirected by netfilter (SO_ORIGINAL_DST unavailable)"))
                channel.reset()
            }
        }
        scheduleFirstFlightTimeout(context)
        context.fireChannelActive()
    }

    private func scheduleFirstFlightTimeout(_ context: ChannelHandlerContext) {
        timeout?.cancel()
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: shared.configuration.firstFlightTimeout) {
            self.perform(self.machine.timeout())
        }
    }

    private func destinationKnown(_ address: SocketAddress, channel: any Channel, tunnelHost: String? = nil) {
        // A flow addressed to the proxy itself was not redirected: nothing to relay to.
        if address == channel.localAddress {
            channel.reset()
            return
        }
        // Egress applies to proxied flows too: decided before any upstream connect.
        if case .denied(let rule) = shared.egressDecision(for: address) {
            shared.metrics.egressDenied.increment()
            shared.audit.write(
                AuditRecord(
                    level: .warn, event: "egress-denied", sandbox: shared.policy.name, connection: 0, reason: rule, action: "reset",
                    destination: "\(address.keyholeIP?.description ?? "?"):\(address.port ?? 0)"))
            channel.reset()
            return
        }
        let session = Session(
            id: shared.newConnectionID(), shared: shared, guest: channel, destination: address,
            policy: shared.currentPolicy(on: channel.eventLoop))
        session.tunnelHost = tunnelHost
        self.session = session
        // With an idle verified connection to this address, connect only if the first
        // flight cannot use it.
        let deferConnect = shared.upstreamPool.isEnabled && shared.upstreamPool.hasIdle(to: address, on: channel.eventLoop)
        perform(machine.destinationKnown(deferConnect: deferConnect))
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        perform(machine.guestRead(unwrapInboundIn(data)))
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        session?.guestClosed()
        context.fireChannelInactive()
    }

    /// The upstream sent its first bytes before the pipelines were built.
    func upstreamSpoke(from speaker: Session) {
        guard speaker === session else { return }
        perform(machine.upstreamSpoke())
    }

    private func perform(_ actions: [FirstFlightStateMachine.Action]) {
        guard let context else { return }
        for action in actions {
            switch action {
            case .connect:
                guard let session else { continue }
                session.connectUpstream(firstFlight: self).assumeIsolated().whenComplete { result in
                    // A flow that became a CONNECT tunnel has a new session by now.
                    guard self.session === session else { return }
                    switch result {
                    case .success: self.perform(self.machine.upstreamConnected())
                    case .failure: self.perform(self.machine.upstreamFailed())
                    }
                }
            case .stopReading:
                context.channel.setOption(.autoRead, value: false).whenFailure { _ in }
            case .setUp(let kind):
                timeout?.cancel()
                guard let session else { continue }
                // An upstream that accepts the connection but never completes its TLS
                // handshake must not hold the guest forever.
                timeout = context.eventLoop.assumeIsolated().scheduleTask(in: shared.configuration.connectTimeout) {
                    session.record(.warn, "upstream-setup-timeout", reason: "the upstream did not complete its handshake in time", action: "reset")
                    self.perform(self.machine.upstreamFailed())
                }
                let upstreamReady =
                    session.upstream != nil
                    ? context.eventLoop.makeSucceededVoidFuture() : session.upstreamForDeferredFlow(kind: kind, firstFlight: self)
                upstreamReady.assumeIsolated().flatMap {
                    session.setUp(kind: kind, context: context)
                }.whenComplete { result in
                    switch result {
                    case .success: self.handOver()
                    case .failure: self.perform(self.machine.upstreamFailed())
                    }
                }
            case .reset:
                session?.abort()
                context.channel.reset()
            case .tunnel:
                timeout?.cancel()
                guard let session, let request = machine.takeTunnelRequest() else { continue }
                openTunnel(request, session: session, context: context)
                return
            }
        }
    }

    /// Answers the guest's `CONNECT` and starts the flow inside the tunnel.
    private func openTunnel(_ request: ByteBuffer, session: Session, context: ChannelHandlerContext) {
        let bytes = Array(request.readableBytesView)
        let end = FirstFlightStateMachine.headEnd(in: bytes)
        let head = request.getSlice(at: request.readerIndex, length: end ?? bytes.count)!
        let rest = request.getSlice(at: request.readerIndex + (end ?? bytes.count), length: request.readableBytes - (end ?? bytes.count))!
        // The engine reads the head first (a placeholder in it is a violation, whatever
        // else is wrong); refused (audited, the guest reset), or on to the CONNECT host:
        // either way the original destination's connection is not used.
        guard let target = session.tunnelTarget(head: head, complete: end != nil, nested: inTunnel) else { return }
        session.discardUpstream()
        let channel = context.channel
        switch target {
        case .address(let address, let port):
            startTunnel(to: [address], port: port, host: nil, rest: rest, session: session, channel: channel)
        case .name(let host, let port):
            guard let resolver = shared.configuration.tunnelResolver else {
                session.record(.warn, "tunnel-refused", reason: "no trusted resolver for CONNECT hosts", action: "reset", detail: host)
                channel.reset()
                return
            }
            resolver.resolve(host, on: channel.eventLoop).hop(to: channel.eventLoop).assumeIsolated().whenComplete { result in
                let found = ((try? result.get()) ?? []).filter { Self.mayTunnel(to: $0.address, shared: self.shared) }
                guard !found.isEmpty else {
                    session.record(
                        .warn, "tunnel-refused", reason: "the CONNECT host does not resolve through a trusted resolver to a reachable address",
                        action: "reset", detail: host)
                    channel.reset()
                    return
                }
                for (address, ttl) in found { self.shared.dns.record(name: host, address: address, ttl: ttl) }
                self.startTunnel(to: found.map(\.address), port: port, host: host, rest: rest, session: session, channel: channel)
            }
        }
    }

    /// Never the appliance itself, whatever `network.egress` says: its loopback services
    /// (metrics, resolvers) and its own addresses are no tunnel's destination.
    static func mayTunnel(to address: IPAddress, shared: ProxyShared) -> Bool {
        let scope = address.scope
        return scope != .loopback && scope != .unspecified && !shared.configuration.applianceAddresses.contains(address.unmapped)
    }

    private func startTunnel(to addresses: [IPAddress], port: Int, host: String?, rest: ByteBuffer, session: Session, channel: any Channel) {
        guard let context, channel.isActive else { return }
        // The first address egress allows (its decision is audited if none is).
        let candidates = addresses.filter { Self.mayTunnel(to: $0, shared: shared) }.compactMap { try? SocketAddress(ipAddress: $0.description, port: port) }
        guard let address = candidates.first(where: { shared.egressDecision(for: $0).isAllowed }) else {
            let rule: String
            if let first = candidates.first, case .denied(let denied) = shared.egressDecision(for: first) { rule = denied } else { rule = "the appliance itself" }
            shared.metrics.egressDenied.increment()
            session.record(.warn, "egress-denied", reason: rule, action: "reset", detail: "CONNECT \(host ?? addresses.first?.description ?? "?"):\(port)")
            channel.reset()
            return
        }
        session.record(.info, "tunnel", action: "answered", detail: "CONNECT \(host ?? address.keyholeIP?.description ?? "?"):\(port) → \(address.keyholeIP?.description ?? "?")")
        // What the guest sent after the head, then whatever arrived while it was checked.
        var first = rest
        if var leftover = machine.takeLeftover() { first.writeBuffer(&leftover) }
        inTunnel = true
        machine = FirstFlightStateMachine()
        channel.writeAndFlush(ByteBuffer(string: "HTTP/1.1 200 Connection established\r\n\r\n"), promise: nil)
        scheduleFirstFlightTimeout(context)
        destinationKnown(address, channel: channel, tunnelHost: host)
        if first.readableBytes > 0 { perform(machine.guestRead(first)) }
        // Read on only while the new flow is undecided (what it decided stands).
        if machine.wantsGuestBytes {
            channel.setOption(.autoRead, value: true).whenFailure { _ in }
            channel.read()
        }
    }

    /// Replays what was read to the pipeline that now follows, removes itself, reads again.
    private func handOver() {
        timeout?.cancel()
        guard let context else { return }
        let replay = machine.setUpDone()
        if let replay, replay.readableBytes > 0 { context.fireChannelRead(NIOAny(replay)) }
        let channel = context.channel
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        session?.updateGuestReading()
        if channel.isActive { channel.read() }
    }
}

@available(*, unavailable)
extension FirstFlightHandler: Sendable {}
