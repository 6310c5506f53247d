import NIOCore
import Synchronization

/// Idle upstream TLS connections, kept for the next guest connection to the same place.
///
/// A connection enters only from a `Session` that verified it (its certificate names the
/// SNI as a DNS name, on a chain to a trusted root) and left it at a clean boundary: HTTP/1.1,
/// every response read whole, nothing of another request sent, no switch, no violation.
/// It is taken only for the same destination (address and port), the same verified server
/// name, on the same event loop, and by a guest that offers no more than it was offered
/// (`h2` or not). The guest connection that takes it still passes every per-connection
/// check (egress, SNI, the DNS pin, Host = SNI on every request); what it skips is the
/// upstream handshake, whose verified identity it inherits. Requests of two guest
/// connections never share one upstream connection at the same time.
///
/// Bounded: `maxPerDestination` idle connections per address, `maxTotal` in all (the
/// oldest go first), each closed after `idleTimeout` or as soon as the upstream sends
/// anything or closes.
final class UpstreamPool: Sendable {
    struct Entry: Sendable {
        let channel: any Channel
        let serverName: String
        /// The upstream was offered `h2` (and chose `protocol`, never `h2`: HTTP/2
        /// connections are not pooled).
        let offeredHTTP2: Bool
        let applicationProtocol: String?
        let since: NIODeadline
        /// The policy generation it was made and used under (`ProxyShared.policyGeneration`).
        let generation: UInt64
    }

    let idleTimeout: TimeAmount
    let maxPerDestination: Int
    let maxTotal: Int
    private let state = Mutex<[SocketAddress: [Entry]]>([:])

    init(idleTimeout: TimeAmount, maxPerDestination: Int = 32, maxTotal: Int = 1024) {
        self.idleTimeout = idleTimeout
        self.maxPerDestination = maxPerDestination
        self.maxTotal = maxTotal
    }

    var isEnabled: Bool { idleTimeout > .zero && maxTotal > 0 }

    /// Idle connections in the pool.
    var count: Int { state.withLock { $0.values.reduce(0) { $0 + $1.count } } }

    /// Whether a connection to `destination` on `loop` is idle here (then a new guest
    /// connection there waits for its first bytes before connecting: it may not need to).
    func hasIdle(to destination: SocketAddress, on loop: any EventLoop) -> Bool {
        state.withLock { $0[destination]?.contains { $0.channel.eventLoop === loop } ?? false }
    }

    /// The newest idle connection for this destination, name and loop, taken out of the pool.
    /// Call on `loop`: the connection's handlers run there, so it cannot close under the caller.
    /// `offersHTTP2` nil: any (a session that already speaks HTTP/1.1 with its guest).
    func take(to destination: SocketAddress, serverName: String, offersHTTP2: Bool?, generation: UInt64, on loop: any EventLoop) -> Entry? {
        state.withLock { entries in
            guard var list = entries[destination],
                let index = list.lastIndex(where: {
                    $0.channel.eventLoop === loop && $0.serverName == serverName && (offersHTTP2 == nil || $0.offeredHTTP2 == offersHTTP2)
                        && $0.generation == generation && $0.channel.isActive
                })
            else { return nil }
            let entry = list.remove(at: index)
            entries[destination] = list.isEmpty ? nil : list
            return entry
        }
    }

    /// Keeps `entry` for `destination`. Returns the connections it pushed out (to be closed).
    func put(_ entry: Entry, to destination: SocketAddress) -> [any Channel] {
        state.withLock { entries in
            var evicted: [any Channel] = []
            var list = entries[destination] ?? []
            list.append(entry)
            while list.count > maxPerDestination { evicted.append(list.removeFirst().channel) }
            entries[destination] = list
            var total = entries.values.reduce(0) { $0 + $1.count }
            while total > maxTotal {
                // The oldest connection anywhere.
                let idle = entries.flatMap { key, list in list.map { (key: key, entry: $0) } }
                guard let oldest = idle.min(by: { $0.entry.since < $1.entry.since }) else { break }
                evicted.append(oldest.entry.channel)
                let kept = entries[oldest.key]!.filter { $0.channel !== oldest.entry.channel }
                entries[oldest.key] = kept.isEmpty ? nil : kept
                total -= 1
            }
            return evicted
        }
    }

    /// Forgets `channel` (it closed, spoke, or timed out).
    func remove(_ channel: any Channel) {
        state.withLock { entries in
            for (key, list) in entries where list.contains(where: { $0.channel === channel }) {
                let kept = list.filter { $0.channel !== channel }
                entries[key] = kept.isEmpty ? nil : kept
            }
        }
    }

    /// Closes every idle connection (a policy reload, shutdown).
    func drain() {
        let all = state.withLock { entries in
            defer { entries = [:] }
            return entries.values.flatMap { $0.map(\.channel) }
        }
        for channel in all { channel.close(promise: nil) }
    }
}

/// Sits on an idle pooled upstream connection: anything from the upstream (bytes, a close,
/// an error) or the idle timeout ends it and takes it out of the pool.
final class PooledIdleHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let pool: UpstreamPool
    private let deadline: NIODeadline
    private var timer: Scheduled<Void>?

    /// `deadline`: when the connection has been idle for the pool's idle timeout.
    init(pool: UpstreamPool, deadline: NIODeadline) {
        self.pool = pool
        self.deadline = deadline
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        let pool = self.pool
        timer = context.eventLoop.scheduleTask(deadline: deadline) {
            pool.remove(channel)
            channel.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Nothing was asked: an upstream that speaks now is not one to send requests to.
        pool.remove(context.channel)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        pool.remove(context.channel)
        timer?.cancel()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        pool.remove(context.channel)
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension PooledIdleHandler: Sendable {}
