package tpm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// The peers file lists every node's current TPM key, one line each, as
// `kubekms tpm public` prints it:
//
//	NODE HANDLE PCRS PUBLIC
//
// NODE is a label (the host name), HANDLE the key's persistent handle on
// that node, PCRS the PCRs its policy binds ("-" for none), PUBLIC the
// base64 of the key's TPM2B_PUBLIC. Blank lines and lines starting with #
// are ignored. The file holds only public keys.

// Line is one peers-file line.
func (m member) line() string {
	return fmt.Sprintf("%s 0x%x %s %s", m.node, uint32(m.handle), formatPCRs(m.pcrs), base64.StdEncoding.EncodeToString(m.public))
}

func parsePeerLine(line string) (member, error) {
	f := strings.Fields(line)
	if len(f) != 4 {
		return member{}, fmt.Errorf("want NODE HANDLE PCRS PUBLIC, got %d fields", len(f))
	}
	h, err := parseHandle(f[1])
	if err != nil {
		return member{}, err
	}
	var pcrs []uint
	if f[2] != "-" {
		if pcrs, err = parsePCRs(f[2]); err != nil {
			return member{}, err
		}
	}
	raw, err := base64.StdEncoding.DecodeString(f[3])
	if err != nil {
		return member{}, fmt.Errorf("public key: %w", err)
	}
	b2, err := tpm2.Unmarshal[tpm2.TPM2BPublic](raw)
	if err != nil {
		return member{}, fmt.Errorf("public key: %w", err)
	}
	pub, err := b2.Contents()
	if err != nil {
		return member{}, fmt.Errorf("public key: %w", err)
	}
	if err := checkPublic(pub); err != nil {
		return member{}, err
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		return member{}, err
	}
	k, err := ecdhPub(*pub)
	if err != nil {
		return member{}, err
	}
	return member{node: f[0], name: name.Buffer, handle: h, pcrs: pcrs, pub: k, public: raw}, nil
}

// readPeers reads the peers file (re-read on every probe and wrap, so a
// changed file takes effect without a restart).
func readPeers(path string) ([]member, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("peers file: %w", err)
	}
	defer f.Close()
	var out []member
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		m, err := parsePeerLine(line)
		if err != nil {
			return nil, fmt.Errorf("peers file %s line %d: %w", path, n, err)
		}
		if slices.ContainsFunc(out, func(o member) bool { return bytes.Equal(o.name, m.name) }) {
			return nil, fmt.Errorf("peers file %s line %d: key of %s listed twice", path, n, m.node)
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("peers file %s: %w", path, err)
	}
	if len(out) == 0 || len(out) > maxNodes {
		return nil, fmt.Errorf("peers file %s lists %d keys, want 1 to %d", path, len(out), maxNodes)
	}
	return out, nil
}

// Provision creates a new TPM key for uri — a primary key of the owner
// (storage) hierarchy from a random template, bound to the URI's PCRs at
// their current values — and persists it at the next free handle above the
// current key in the URI's range. It returns the key's peers-file line.
// Provisioning again is a rotation.
func Provision(_ context.Context, uri, node string) (string, error) {
	u, d, hs, err := openKeyRange(uri)
	if err != nil {
		return "", err
	}
	defer d.Close()
	h := u.First
	if len(hs) > 0 {
		h = slices.Max(hs) + 1
	}
	if h > u.Last {
		return "", fmt.Errorf("no free handle above 0x%x in 0x%x-0x%x: evict old keys (after a storage migration) or widen the range", uint32(slices.Max(hs)), uint32(u.First), uint32(u.Last))
	}
	var policy []byte
	if len(u.PCRs) > 0 {
		if policy, err = pcrPolicy(d, u.PCRs); err != nil {
			return "", err
		}
	}
	unique := make([]byte, 64)
	if _, err := rand.Read(unique); err != nil {
		return "", err
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(keyTemplate(policy, unique)),
	}.Execute(d)
	if err != nil {
		return "", fmt.Errorf("TPM2_CreatePrimary: %w", err)
	}
	defer func() { _, _ = tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(d) }()
	if _, err := (tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name},
		PersistentHandle: h,
	}).Execute(d); err != nil {
		return "", fmt.Errorf("TPM2_EvictControl to 0x%x: %w", uint32(h), err)
	}
	return publicLine(d, h, node, u.PCRs)
}

// openKeyRange parses uri, opens its TPM and lists the persistent handles
// in its key range. The caller closes the device.
func openKeyRange(uri string) (KeyURI, transport.TPMCloser, []tpm2.TPMHandle, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return KeyURI{}, nil, nil, err
	}
	d, err := openDevice(u.Device)
	if err != nil {
		return KeyURI{}, nil, nil, fmt.Errorf("open TPM %s: %w", u.Device, err)
	}
	hs, err := persistentHandles(d, u.First, u.Last)
	if err != nil {
		d.Close()
		return KeyURI{}, nil, nil, err
	}
	return u, d, hs, nil
}

// PublicLine returns the peers-file line of this node's current key.
func PublicLine(_ context.Context, uri, node string) (string, error) {
	u, d, hs, err := openKeyRange(uri)
	if err != nil {
		return "", err
	}
	defer d.Close()
	if len(hs) == 0 {
		return "", fmt.Errorf("no key at 0x%x-0x%x: run kubekms tpm provision", uint32(u.First), uint32(u.Last))
	}
	return publicLine(d, slices.Max(hs), node, u.PCRs)
}

func publicLine(t transport.TPM, h tpm2.TPMHandle, node string, pcrs []uint) (string, error) {
	if node == "" || strings.ContainsAny(node, " \t\n#") {
		return "", fmt.Errorf("node label %q: want a non-empty word", node)
	}
	rsp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(t)
	if err != nil {
		return "", fmt.Errorf("TPM2_ReadPublic 0x%x: %w", uint32(h), err)
	}
	m := member{node: node, handle: h, pcrs: pcrs, public: tpm2.Marshal(rsp.OutPublic)}
	if _, err := parsePeerLine(m.line()); err != nil {
		return "", fmt.Errorf("key at 0x%x: %w", uint32(h), err)
	}
	return m.line(), nil
}
