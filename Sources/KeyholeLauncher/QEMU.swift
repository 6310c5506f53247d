import Foundation
import KeyholeNetfilter
public import KeyholePolicy

/// How the guest is booted: the accelerator probe and QEMU's command line.
public enum QEMU {
    public static let binary = "/usr/bin/qemu-system-x86_64"

    public enum Accelerator: String, Sendable {
        case kvm, tcg
    }

    /// Whether KVM really works: `/dev/kvm` may exist on hosts where ordinary guests cannot
    /// run (here, only PVM guests boot and QEMU aborts setting up the vCPU). QEMU is started
    /// paused on a KVM microvm with QMP on stdout; once it has greeted, the vCPU is being set
    /// up, and a QEMU still alive 1.5 s later has one. nil when KVM works, else why not. (A
    /// guest that still dies at once under KVM is booted again with TCG by the launcher.)
    public static func probeKVM() -> String? {
        guard FileManager.default.fileExists(atPath: "/dev/kvm") else { return "/dev/kvm does not exist" }
        guard access("/dev/kvm", R_OK | W_OK) == 0 else { return "/dev/kvm is not accessible to this user" }
        let output = ChildProcess.pipe()
        let errors = ChildProcess.pipe()
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { for fd in [output.read, errors.read, null] { close(fd) } }
        let arguments = [
            "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "64", "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-qmp", "stdio",
        ]
        let child: ChildProcess
        do {
            child = try ChildProcess(binary, arguments, stdin: null, stdout: output.write, stderr: errors.write)
        } catch {
            close(output.write)
            close(errors.write)
            return "cannot start \(binary): \(error)"
        }
        close(output.write)
        close(errors.write)
        // The QMP greeting, or EOF when QEMU dies first.
        var descriptor = pollfd(fd: output.read, events: Int16(POLLIN), revents: 0)
        var greeting = [UInt8](repeating: 0, count: 512)
        var answered = false
        if Glibc.poll(&descriptor, 1, 15_000) > 0 {
            let n = greeting.withUnsafeMutableBytes { read(output.read, $0.baseAddress, $0.count) }
            answered = n > 0 && String(decoding: greeting[0..<n], as: UTF8.self).contains("QMP")
        }
        if answered {
            // The vCPU is reset just after the greeting; a KVM that cannot run it aborts then.
            let settle = Date().addingTimeInterval(1.5)
            while child.poll() == nil && Date() < settle { usleep(20_000) }
            answered = child.poll() == nil
        }
        child.signal(SIGKILL)
        let status = child.wait()
        if answered { return nil }
        let first = String(decoding: ChildProcess.readAll(errors.read), as: UTF8.self).split(separator: "\n").first.map(String.init)
        return (first ?? "QEMU exited with status \(status) before starting a KVM machine").replacingOccurrences(of: "qemu-system-x86_64: ", with: "")
    }

    /// The accelerator for `accel`; for `auto` without KVM, `warning` says why TCG is used.
    public static func choose(_ accel: GuestSpec.Accel) throws(LauncherError) -> (Accelerator, warning: String?) {
        switch accel {
        case .tcg:
            return (.tcg, nil)
        case .kvm:
            if let problem = probeKVM() {
                throw .accelerator("guest.accel is kvm but KVM does not work on this host: \(problem); use accel: auto or tcg")
            }
            return (.kvm, nil)
        case .auto:
            if let problem = probeKVM() { return (.tcg, "KVM is not usable here (\(problem)); booting with TCG (software emulation, slower)") }
            return (.kvm, nil)
        }
    }

    public struct Boot: Sendable {
        public var accelerator: Accelerator
        public var kernel: String
        public var initrd: String
        public var cmdline: String
        public var memoryMiB: Int
        public var vcpus: Int
        public var tap: String
        public var mac: String
        /// Block devices (virtio-blk): the guest's disk, then its cloud-init seed.
        public var disks: [Disk] = []
        /// With a command: the console goes to this file, the command's stdout and stderr to
        /// two virtio consoles on Keyhole's stdout and stderr. Without: the console is on stdio.
        public var consoleLog: String?
        /// With `consoleLog`: the guest's one virtio console (its command agent) is this Unix
        /// socket, which QEMU listens on, instead of the command's stdout and stderr.
        public var agentSocket: String?
    }

    public struct Disk: Sendable {
        public var path: String
        public var readOnly: Bool

        public init(path: String, readOnly: Bool) {
            self.path = path
            self.readOnly = readOnly
        }

        /// qcow2 by its magic bytes, raw otherwise (QEMU refuses to guess for writable raw).
        var format: String {
            guard let handle = FileHandle(forReadingAtPath: path) else { return "raw" }
            defer { try? handle.close() }
            let magic = (try? handle.read(upToCount: 4)) ?? Data()
            return magic == Data([0x51, 0x46, 0x49, 0xFB]) ? "qcow2" : "raw"
        }
    }

    public static func arguments(_ boot: Boot) -> [String] {
        var arguments = [
            "-M", "microvm,pit=on,pic=on,rtc=on", "-accel", boot.accelerator.rawValue, "-cpu", boot.accelerator == .kvm ? "host" : "max",
            "-m", String(boot.memoryMiB), "-smp", String(boot.vcpus), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", boot.kernel, "-initrd", boot.initrd, "-append", boot.cmdline,
            "-netdev", "tap,id=net0,ifname=\(boot.tap),script=no,downscript=no", "-device", "virtio-net-device,netdev=net0,mac=\(boot.mac)",
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0",
        ]
        for (index, disk) in boot.disks.enumerated() {
            // A comma in a path must be doubled inside QEMU's option syntax.
            let file = disk.path.replacingOccurrences(of: ",", with: ",,")
            arguments += [
                "-drive", "file=\(file),if=none,id=disk\(index),format=\(disk.format)" + (disk.readOnly ? ",readonly=on" : ""),
                "-device", "virtio-blk-device,drive=disk\(index)",
            ]
        }
        if let log = boot.consoleLog, let socket = boot.agentSocket {
            arguments += [
                "-serial", "file:" + log, "-device", "virtio-serial-device",
                "-chardev", "socket,id=agent0,path=\(socket.replacingOccurrences(of: ",", with: ",,")),server=on,wait=off",
                "-device", "virtconsole,chardev=agent0",
            ]
        } else if let log = boot.consoleLog {
            arguments += [
                "-serial", "file:" + log, "-device", "virtio-serial-device",
                "-chardev", "stdio,id=out0,signal=off", "-device", "virtconsole,chardev=out0",
                "-chardev", "file,id=err0,path=/proc/self/fd/2,append=on", "-device", "virtconsole,chardev=err0",
            ]
        } else {
            arguments += ["-serial", "mon:stdio"]
        }
        return arguments
    }

    /// The host's CPU clock in kHz (`cpu MHz` of /proc/cpuinfo), for `tsc_early_khz`.
    public static func hostTSCkHz() -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("cpu MHz") {
            if let value = line.split(separator: ":").last.flatMap({ Double($0.trimmingCharacters(in: .whitespaces)) }), value > 0 {
                return Int(value * 1000)
            }
        }
        return nil
    }

    /// A locally administered MAC derived from the sandbox name.
    public static func mac(for name: String) -> String {
        let hash = TapName.hash4(name + "/mac") + TapName.hash4(name + "/mac2")
        var bytes = ["52", "4b"]
        var index = hash.startIndex
        for _ in 0..<4 {
            let next = hash.index(index, offsetBy: 2)
            bytes.append(String(hash[index..<next]))
            index = next
        }
        return bytes.joined(separator: ":")
    }
}
