import CNetfilterQueue
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The error type of `KeyholeNetfilter`.
public enum NetfilterError: Error, Sendable, CustomStringConvertible {
    case queue(String)
    case command(String, String)
    case interface(String, String)

    public var description: String {
        switch self {
        case .queue(let reason): return "NFQUEUE: \(reason)"
        case .command(let command, let output): return "\(command) failed: \(output)"
        case .interface(let name, let reason): return "interface \(name): \(reason)"
        }
    }
}

/// Binds an NFQUEUE and gives every queued packet to `decide` (true: accept, false: drop)
/// on a dedicated thread, before the packet moves on. There is no bypass: while nobody
/// listens on the queue, queued packets are dropped (fail closed).
public final class PacketQueue: @unchecked Sendable {
    public let number: UInt16
    let decide: @Sendable ([UInt8]) -> Bool
    private var handle: OpaquePointer?
    private var queue: OpaquePointer?
    private var thread: Thread?
    private let stopping = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)

    public init(number: UInt16, decide: @escaping @Sendable ([UInt8]) -> Bool) {
        self.number = number
        self.decide = decide
    }

    public func start() throws(NetfilterError) {
        guard let handle = nfq_open() else { throw .queue("cannot open netlink (\(String(cString: strerror(errno))))") }
        self.handle = handle
        _ = nfq_unbind_pf(handle, UInt16(AF_INET))
        _ = nfq_bind_pf(handle, UInt16(AF_INET))
        _ = nfq_unbind_pf(handle, UInt16(AF_INET6))
        _ = nfq_bind_pf(handle, UInt16(AF_INET6))
        let context = Unmanaged.passUnretained(self).toOpaque()
        guard
            let queue = nfq_create_queue(
                handle, number,
                { queueHandle, _, data, context in
                    let me = Unmanaged<PacketQueue>.fromOpaque(context!).takeUnretainedValue()
                    return me.handle(queueHandle, data)
                }, context)
        else {
            nfq_close(handle)
            self.handle = nil
            throw .queue("cannot bind queue \(number) (is another process bound to it?)")
        }
        self.queue = queue
        guard nfq_set_mode(queue, UInt8(NFQNL_COPY_PACKET.rawValue), 0xFFFF) >= 0 else {
            throw .queue("cannot set copy mode on queue \(number)")
        }
        let fd = nfq_fd(handle)
        // Wake up regularly to notice stop().
        var timeout = timeval(tv_sec: 0, tv_usec: 200_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let thread = Thread { [self] in
            self.run(fd: fd)
        }
        thread.name = "keyhole-nfqueue-\(number)"
        self.thread = thread
        thread.start()
    }

    private func run(fd: Int32) {
        guard let handle else { return }
        var buffer = [UInt8](repeating: 0, count: 0x10000 + 4096)
        while !stopping.load(ordering: .relaxed) {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n >= 0 {
                buffer.withUnsafeMutableBytes { raw in
                    _ = nfq_handle_packet(handle, raw.baseAddress!.assumingMemoryBound(to: CChar.self), Int32(n))
                }
            }
            // EAGAIN (timeout) and ENOBUFS (the kernel dropped queued packets under load: they
            // were dropped, not passed) both just continue.
        }
        finished.signal()
    }

    private func handle(_ queueHandle: OpaquePointer?, _ data: OpaquePointer?) -> Int32 {
        guard let header = nfq_get_msg_packet_hdr(data) else { return 0 }
        let id = UInt32(bigEndian: header.pointee.packet_id)
        var payload: UnsafeMutablePointer<UInt8>?
        let length = nfq_get_payload(data, &payload)
        var accept = true
        if length > 0, let payload {
            accept = decide(Array(UnsafeBufferPointer(start: payload, count: Int(length))))
        }
        return nfq_set_verdict(queueHandle, id, UInt32(accept ? NF_ACCEPT : NF_DROP), 0, nil)
    }

    /// Bound to its queue and reading (for health checks).
    public var isRunning: Bool { thread != nil && !stopping.load(ordering: .relaxed) }

    public func stop() {
        guard thread != nil, !stopping.exchange(true, ordering: .relaxed) else { return }
        finished.wait()
        if let queue { nfq_destroy_queue(queue) }
        if let handle { nfq_close(handle) }
        queue = nil
        handle = nil
    }
}
