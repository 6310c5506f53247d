public import KeyholePolicy

#if canImport(Glibc)
import Glibc
#endif

/// The addresses this host (or network namespace) answers to on its interfaces: each
/// interface address and, for IPv6, the subnet-router anycast address of its prefix
/// (a router, which the appliance is, answers to it).
public enum LocalAddresses {
    public static func all() -> [IPAddress] {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return [] }
        defer { freeifaddrs(list) }
        var addresses: [IPAddress] = []
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = cursor {
            defer { cursor = entry.pointee.ifa_next }
            guard let raw = entry.pointee.ifa_addr else { continue }
            switch Int32(raw.pointee.sa_family) {
            case AF_INET:
                let v4 = UnsafeRawPointer(raw).load(as: sockaddr_in.self)
                addresses.append(.v4(UInt32(bigEndian: v4.sin_addr.s_addr)))
            case AF_INET6:
                var v6 = UnsafeRawPointer(raw).load(as: sockaddr_in6.self).sin6_addr
                let bytes = withUnsafeBytes(of: &v6) { Array($0) }
                addresses.append(IPAddress(v6Bytes: bytes))
                if let mask = entry.pointee.ifa_netmask, Int32(mask.pointee.sa_family) == AF_INET6 {
                    var m = UnsafeRawPointer(mask).load(as: sockaddr_in6.self).sin6_addr
                    let maskBytes = withUnsafeBytes(of: &m) { Array($0) }
                    addresses.append(IPAddress(v6Bytes: zip(bytes, maskBytes).map { $0 & $1 }))
                }
            default:
                continue
            }
        }
        return addresses
    }
}
