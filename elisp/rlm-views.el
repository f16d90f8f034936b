;;; rlm-views.el --- Status, trace and log views of the rlm daemon  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.
;;; Commentary:

;; Read-only views, each in its own major mode: `rlm-status' (the
;; daemon and its pool, `rlm-status-mode'), `rlm-trace' (a query's
;; trajectory as the daemon recorded it, `rlm-trace-mode') and
;; `rlm-daemon-log' (the output of the daemon Emacs started,
;; `rlm-log-mode').

;;; Code:

(require 'cl-lib)
(require 'subr-x)
(require 'outline)
(require 'rlm-client)

(defface rlm-heading '((t :inherit bold))
  "Face of headings in rlm buffers."
  :group 'rlm)

(defface rlm-label '((t :inherit font-lock-keyword-face))
  "Face of labels in rlm buffers."
  :group 'rlm)

(defface rlm-error '((t :inherit error))
  "Face of errors in rlm buffers."
  :group 'rlm)

;;;; Status

(define-derived-mode rlm-status-mode special-mode "rlm-status"
  "Major mode showing the daemon's status; \\[revert-buffer] refreshes it."
  (setq-local revert-buffer-function (lambda (&rest _) (rlm-status))))

;;;###autoload
(defun rlm-status ()
  "Show the daemon's status and its pool of model servers.
Return the daemon's status (a plist)."
  (interactive)
  (let* ((st (rlm-request 'daemon/status))
         (pool (condition-case nil
                   (append (plist-get (rlm-request 'pool/status) :providers) nil)
                 (rlm-error nil)))
         (providers (or pool (append (plist-get st :providers) nil)))
         (num (lambda (v fmt) (if (numberp v) (format fmt v) "-")))
         (buf (get-buffer-create "*rlm status*")))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (rlm-status-mode)
        (insert (propertize "rlm daemon" 'face 'rlm-heading) "\n\n")
        (dolist (key '(:version :pid :uptime_s :contexts :jobs :socket :state_dir :embedded))
          (let ((v (plist-get st key)))
            (when (and v (not (equal v "")))
              (insert (propertize (format "%-10s " (substring (symbol-name key) 1))
                                  'face 'rlm-label)
                      (format "%s" v) "\n"))))
        (insert "\n" (propertize
                      (format "%-16s %-9s %-6s %6s %6s %7s %7s %6s %8s %9s  %s\n"
                              "Provider" "Kind" "Health" "Load" "Queue" "TTFT" "tok/s"
                              "Errors" "Requests" "Cost" "Models")
                      'face 'rlm-heading))
        (dolist (p providers)
          (insert (format "%-16s %-9s %-6s %6s %6s %7s %7s %6s %8s %9s  %s\n"
                          (plist-get p :name) (plist-get p :kind)
                          (if (eq (plist-get p :healthy) t) "up"
                            (propertize "DOWN" 'face 'rlm-error))
                          (format "%s/%s" (plist-get p :in_flight) (plist-get p :capacity))
                          (funcall num (plist-get p :queued) "%d")
                          (funcall num (plist-get p :ewma_ttft_s) "%.2fs")
                          (funcall num (plist-get p :ewma_tokens_per_s) "%.0f")
                          (funcall num (and (numberp (plist-get p :error_rate))
                                            (* 100 (plist-get p :error_rate)))
                                   "%.0f%%")
                          (funcall num (plist-get p :requests) "%d")
                          (funcall num (plist-get p :cost) "$%.4f")
                          (mapconcat (lambda (m) (format "%s" m))
                                     (plist-get p :models) ","))))
        (when (null providers) (insert "(no providers)\n"))
        (goto-char (point-min))
        (set-buffer-modified-p nil)))
    (display-buffer buf)
    (message "rlm: daemon %s, pid %s, %d/%d providers healthy, %d in flight"
             (plist-get st :version) (plist-get st :pid)
             (cl-count-if (lambda (p) (eq (plist-get p :healthy) t)) providers)
             (length providers)
             (apply #'+ (mapcar (lambda (p) (or (plist-get p :in_flight) 0)) providers)))
    st))

(defun rlm-pool-models ()
  "Return the models the daemon's pool serves (for completion)."
  (delete-dups
   (cl-loop for p across (or (plist-get (rlm-request 'pool/status) :providers) [])
            append (mapcar (lambda (m) (format "%s" m)) (plist-get p :models)))))

;;;; Trace

(defun rlm--read-job-id ()
  "Read a job id: this buffer's job, else one of this session's.
Candidates are annotated with state, age and question, newest first."
  (if (and rlm--job (not (minibufferp)))
      (rlm-job-id rlm--job)
    (let ((job (rlm-read-job "Trace of job: " rlm--recent-jobs)))
      (if (rlm-job-p job) (rlm-job-id job) job))))

(defvar rlm-trace-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "TAB") #'outline-toggle-children)
    (define-key map (kbd "<backtab>") #'outline-show-all)
    (define-key map (kbd "n") #'outline-next-visible-heading)
    (define-key map (kbd "p") #'outline-previous-visible-heading)
    map)
  "Keymap of `rlm-trace-mode'.")

(define-derived-mode rlm-trace-mode special-mode "rlm-trace"
  "Major mode showing a query's trace: one heading per record.
\\<rlm-trace-mode-map>\\[outline-toggle-children] shows or hides a record, \\[outline-show-all] shows all.

\\{rlm-trace-mode-map}"
  (setq-local outline-regexp "\\*+ ")
  (setq-local outline-level (lambda () 1))
  (outline-minor-mode 1))

(defun rlm--trace-summary (rec)
  "Return a one-line summary of trace record REC."
  (let ((kind (or (plist-get rec :type) (plist-get rec :kind) "record"))
        (first-line (lambda (key)
                      (let ((v (plist-get rec key)))
                        (and (stringp v) (rlm--truncate v 70))))))
    (concat
     (propertize (format "%-8s" kind) 'face 'rlm-heading)
     (if (numberp (plist-get rec :t)) (format " %7.2fs " (plist-get rec :t)) " ")
     (pcase kind
       ("message" (format "%s: %s" (plist-get rec :role) (funcall first-line :content)))
       ("code" (or (funcall first-line :code) ""))
       ("output" (or (funcall first-line :text) (funcall first-line :output) ""))
       ("final" (or (funcall first-line :answer) ""))
       ("start" (or (funcall first-line :query) ""))
       ("error" (or (funcall first-line :message) ""))
       ("subcall" (format "%s %s" (or (plist-get rec :model) "")
                          (or (plist-get rec :status) "")))
       (_ "")))))

(defun rlm--insert-trace-record (rec)
  "Insert REC, one trace record (a plist): a summary line, then its fields."
  (insert "* " (rlm--trace-summary rec) "\n")
  (let ((rest rec))
    (while rest
      (let ((k (car rest)) (v (cadr rest)))
        (unless (memq k '(:kind :type :t))
          (let ((s (if (stringp v) v (format "%S" v))))
            (insert (propertize (format "  %s:" (substring (symbol-name k) 1)) 'face 'rlm-label)
                    (if (string-match-p "\n" s)
                        (concat "\n" (replace-regexp-in-string
                                      "^" "    " (string-trim-right s)))
                      (concat " " s))
                    "\n"))))
      (setq rest (cddr rest)))))

;;;###autoload
(defun rlm-trace (job-id)
  "Show the trajectory of the query JOB-ID as the daemon recorded it.
In a result buffer, that buffer's query; else one of this session's
queries (or any job id) read in the minibuffer."
  (interactive (list (rlm--read-job-id)))
  (let* ((res (rlm-request 'query/trace (list :job job-id)))
         (records (append (plist-get res :records) nil))
         (buf (get-buffer-create (format "*rlm trace: %s*" job-id))))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (rlm-trace-mode)
        (insert (propertize (format "Trace of %s (%d records)\n" job-id (length records))
                            'face 'rlm-heading))
        (dolist (rec records)
          (rlm--insert-trace-record rec))
        (goto-char (point-min))
        (outline-hide-body)
        (set-buffer-modified-p nil)))
    (display-buffer buf rlm-display-buffer-action)
    buf))

;;;; The daemon's log

(define-derived-mode rlm-log-mode special-mode "rlm-log"
  "Major mode showing the log of the daemon Emacs started.
\\[revert-buffer] reloads it."
  (setq-local revert-buffer-function (lambda (&rest _) (rlm-daemon-log))))

;;;###autoload
(defun rlm-daemon-log ()
  "Show the log of the daemon Emacs started, and the previous run's.
The log is `rlm-daemon-log-file' (the previous run in FILE.old);
without it, the buffer \" *rlmd*\".  Return the log buffer."
  (interactive)
  (let ((buf (get-buffer-create "*rlm daemon log*"))
        (file rlm-daemon-log-file))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (rlm-log-mode)
        (cond
         ((and file (file-exists-p file))
          (insert (propertize (format "Log of the daemon Emacs started: %s\n" file)
                              'face 'rlm-heading))
          (insert-file-contents file)
          (goto-char (point-max))
          (when (file-exists-p (concat file ".old"))
            (insert "\n" (propertize (format "The previous run (%s.old):\n" file)
                                     'face 'rlm-heading))
            (insert-file-contents (concat file ".old"))))
         ((get-buffer " *rlmd*")
          (insert (with-current-buffer " *rlmd*" (buffer-string))))
         (t (insert "Emacs has not started a daemon.  A daemon run by systemd logs to its journal:\n"
                    "  journalctl --user -u rlmd\n")))
        (insert "\n" (propertize
                      "On SIGTERM the daemon drains: queries in flight may finish, up to its --drain-timeout (30 s by default), before it exits.\n"
                      'face 'shadow))
        (set-buffer-modified-p nil)))
    (display-buffer buf)
    buf))

(provide 'rlm-views)
;;; rlm-views.el ends here
