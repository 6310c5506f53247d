public import KeyholePolicy
public import NIOCore

/// Resolves the host of a guest's `CONNECT` through a resolver Keyhole trusts (BRIEF §4
/// (c)): the tunnel goes to an address a trusted answer gave for the name, and that answer
/// is pinned, so the identity checks hold inside the tunnel as for a direct flow. The
/// appliance provides one that asks its trusted resolvers (`network.dns`, else the host's).
public protocol TunnelResolver: Sendable {
    /// The addresses of `name` (A and AAAA, through CNAMEs) with their TTLs; empty when
    /// the name does not resolve.
    func resolve(_ name: String, on eventLoop: any EventLoop) -> EventLoopFuture<[(address: IPAddress, ttl: UInt32)]>
}
