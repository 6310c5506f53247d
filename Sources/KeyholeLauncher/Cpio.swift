/// A writer for the `newc` cpio format the kernel unpacks as an initramfs. Archives may be
/// concatenated: the kernel unpacks them in order, later entries replacing earlier ones.
public struct CpioArchive: Sendable {
    public private(set) var bytes: [UInt8] = []
    private var inode: UInt32 = 1

    public init() {}

    public mutating func directory(_ path: String, mode: UInt32 = 0o755) {
        entry(path, mode: 0o040000 | mode, data: [])
    }

    public mutating func file(_ path: String, _ data: [UInt8], mode: UInt32 = 0o644) {
        entry(path, mode: 0o100000 | mode, data: data)
    }

    public mutating func file(_ path: String, _ text: String, mode: UInt32 = 0o644) {
        file(path, Array(text.utf8), mode: mode)
    }

    /// Ends the archive; returns its bytes.
    public mutating func finish() -> [UInt8] {
        entry("TRAILER!!!", mode: 0, data: [], nlink: 1)
        return bytes
    }

    private mutating func entry(_ path: String, mode: UInt32, data: [UInt8], nlink: UInt32? = nil) {
        let name = Array(path.utf8) + [0]
        let fields: [UInt32] = [
            path == "TRAILER!!!" ? 0 : inode, mode, 0, 0, nlink ?? ((mode & 0o040000) != 0 ? 2 : 1), 0,
            UInt32(data.count), 0, 0, 0, 0, UInt32(name.count), 0,
        ]
        inode += 1
        bytes += Array("070701".utf8)
        for field in fields {
            let hex = String(field, radix: 16, uppercase: true)
            bytes += Array((String(repeating: "0", count: 8 - hex.count) + hex).utf8)
        }
        bytes += name
        pad()
        bytes += data
        pad()
    }

    private mutating func pad() {
        while bytes.count % 4 != 0 { bytes.append(0) }
    }
}
