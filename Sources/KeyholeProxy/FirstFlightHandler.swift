import KeyholePolicy
import NIOCore

/// Drives `FirstFlightStateMachine` for one guest connection: reads the original
/// destination, checks egress, has the `Session` connect upstream at once, buffers the
/// guest's first bytes, and hands the connection over once the pipelines are built,
/// replaying every byte it read (then it removes itself).
final class FirstFlightHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    let shared: ProxyShared
    private var machine = FirstFlightStateMachine()
    private var session: Session?
    private var timeout: Scheduled<Void>?
    private var context: ChannelHandlerContext?

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
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: shared.configuration.firstFlightTimeout) {
            self.perform(self.machine.timeout())
        }
        context.fireChannelActive()
    }

    private func destinationKnown(_ address: SocketAddress, channel: any Channel) {
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
        session = Session(id: shared.newConnectionID(), shared: shared, guest: channel, destination: address, policy: shared.policy)
        perform(machine.destinationKnown())
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
    func upstreamSpoke() {
        perform(machine.upstreamSpoke())
    }

    private func perform(_ actions: [FirstFlightStateMachine.Action]) {
        guard let context else { return }
        for action in actions {
            switch action {
            case .connect:
                guard let session else { continue }
                session.connectUpstream(firstFlight: self).assumeIsolated().whenComplete { result in
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
                session.setUp(kind: kind, context: context).assumeIsolated().whenComplete { result in
                    switch result {
                    case .success: self.handOver()
                    case .failure: self.perform(self.machine.upstreamFailed())
                    }
                }
            case .reset:
                session?.abort()
                context.channel.reset()
            }
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
